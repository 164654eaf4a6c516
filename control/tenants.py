"""`airlock tenant add|remove`: the edits to the configuration and the security team's policy files.

Each edit is text in, text out, shown as a unified diff before anything is written: comments and
the layout of the files stay as they are, added lines go at the end, removed ones are exactly the
tenant's tables and lines. Edited files are checked as a whole (the configuration parses, the policy
loads, lints without errors and its cases pass) before any of them is written, and each is
replaced in one step. A running `airlock up` follows the files: it starts or stops the tenant.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import config as config_mod
from gateway.policy.authz import load_checked
from gateway.policy.rules import PolicyError

__all__ = ["Edit", "TenantEditError", "add_tenant", "remove_tenant"]

_SUBJECT = re.compile(r"[A-Za-z0-9._@:/+-]{1,256}")


class TenantEditError(Exception):
    """The edit can't be made (or would leave a file the gateway refuses); the message says why."""


@dataclass(frozen=True)
class Edit:
    path: Path
    before: str
    after: str

    def diff(self) -> str:
        lines = difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=str(self.path), tofile=str(self.path),
        )  # fmt: skip
        return "".join(lines)

    def apply(self) -> None:
        """Replace the file in one step, keeping its mode."""
        mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.after)
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TenantEditError(f"cannot read {path} ({exc.strerror})") from None


def _appended(text: str, block: str) -> str:
    return text.rstrip("\n") + "\n\n" + block if text.strip() else block


def _toml_list(values: Iterable[str]) -> str:
    """TOML basic strings (JSON's escaping is TOML's): a value can't end its string early."""
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _config_file(cfg: config_mod.Config) -> Path:
    if cfg.source == "<defaults>":
        raise TenantEditError(
            "the built-in demo configuration is not a file to edit: pass --config FILE (the file "
            "`airlock up --config FILE` runs)"
        )
    return Path(cfg.source)


def _subject(tenant: str, subject: str) -> str:
    """A policy subject: `alice` means TENANT/alice; TENANT/NAME and SPIFFE IDs as given."""
    if not _SUBJECT.fullmatch(subject) or "," in subject:
        raise TenantEditError(f"{subject!r} is not a subject (TENANT/NAME, NAME or a SPIFFE ID)")
    return subject if "/" in subject else f"{tenant}/{subject}"


def add_tenant(
    cfg: config_mod.Config,
    policy_dir: Path,
    name: str,
    *,
    models: list[str],
    issuers: list[str],
    users: Sequence[str] = (),
    admins: Sequence[str] = (),
    quota: dict[str, float | int] | None = None,
) -> list[Edit]:
    """The edits that add tenant `name`: the policy's tenants.toml (issuers, quota) and policy.csv
    (role lines) first, the configuration (its models) last; each file already listing it is left."""
    config_path = _config_file(cfg)
    unknown = [m for m in models if m not in cfg.models]
    if unknown:
        raise TenantEditError(
            f"model(s) {', '.join(unknown)} not in {config_path} (its models: {', '.join(cfg.models)})"
        )
    edits = []
    tenants_toml = policy_dir / "tenants.toml"
    text = _read(tenants_toml)
    if not _table_lines(text, name):
        block = f"[tenants.{name}]\nissuers = {_toml_list(issuers)}\n"
        limits = {k: v for k, v in (quota or {}).items() if v is not None}
        if limits:
            block += f"\n[tenants.{name}.quota]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
        edits.append(Edit(tenants_toml, text, _appended(text, block)))
    lines = [f"g, {_subject(name, s)}, user, {name}" for s in users]
    lines += [f"g, {_subject(name, s)}, tenant-admin, {name}" for s in admins]
    if lines:
        csv = policy_dir / "policy.csv"
        text = _read(csv)
        edits.append(Edit(csv, text, _appended(text, f"# {name}\n" + "\n".join(lines) + "\n")))
    text = _read(config_path)
    if name in cfg.tenants:
        if not edits:
            raise TenantEditError(f"tenant {name!r} is already in {config_path} and {tenants_toml}")
    else:
        block = f"[tenants.{name}]\nmodels = {_toml_list(models)}\n"
        edits.append(Edit(config_path, text, _appended(text, block)))
    _check(cfg, policy_dir, edits)
    return edits


def remove_tenant(cfg: config_mod.Config, policy_dir: Path, name: str) -> list[Edit]:
    """The edits that remove tenant `name`: the configuration first (`airlock up` drains and stops
    it), then the policy: its tenants.toml tables, the policy.csv lines in its tenant, its cases."""
    config_path = _config_file(cfg)
    edits = []
    text = _read(config_path)
    if _table_lines(text, name):
        edits.append(Edit(config_path, text, _without_tables(text, name)))
    elif name in cfg.tenants:
        raise TenantEditError(
            f"{config_path} defines tenant {name!r} other than as a [tenants.{name}] table: edit it by hand"
        )
    tenants_toml = policy_dir / "tenants.toml"
    text = _read(tenants_toml)
    if _table_lines(text, name):
        edits.append(Edit(tenants_toml, text, _without_tables(text, name)))
    csv = policy_dir / "policy.csv"
    text = _read(csv)
    kept = [line for line in text.splitlines(keepends=True) if not _policy_line_of(line, name)]
    if len(kept) != len(text.splitlines()):
        edits.append(Edit(csv, text, _tidy("".join(kept))))
    cases = policy_dir / "tests.yaml"
    if cases.exists():
        text = _read(cases)
        pattern = re.compile(rf"^\s*-\s*\{{.*\btenant:\s*\"?{re.escape(name)}\"?\s*[,}}]")
        kept = [line for line in text.splitlines(keepends=True) if not pattern.match(line)]
        if len(kept) != len(text.splitlines()):
            edits.append(Edit(cases, text, "".join(kept)))
    if not edits:
        raise TenantEditError(f"tenant {name!r} is in neither {config_path} nor {tenants_toml}")
    _check(cfg, policy_dir, edits)
    return edits


def _table_lines(text: str, name: str) -> list[int]:
    header = re.compile(rf"^\s*\[\s*tenants\.{re.escape(name)}(\.[^\]]*)?\s*\]\s*(#.*)?$")
    return [i for i, line in enumerate(text.splitlines()) if header.match(line)]


def _without_tables(text: str, name: str) -> str:
    """`text` without [tenants.NAME] and its sub-tables (each up to the next table header)."""
    lines = text.splitlines(keepends=True)
    starts = set(_table_lines(text, name))
    out, skipping = [], False
    for i, line in enumerate(lines):
        if re.match(r"^\s*\[", line):
            skipping = i in starts
        if not skipping:
            out.append(line)
    return _tidy("".join(out))


def _tidy(text: str) -> str:
    """No run of blank lines where lines were removed, one newline at the end."""
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def _policy_line_of(line: str, name: str) -> bool:
    """A p line whose tenant is `name`, a g line in `name`, or the `# name` comment heading them."""
    fields = [f.strip() for f in line.split(",")]
    if fields[0] == "p" and len(fields) == 6:
        return fields[2] == name
    if fields[0] == "g" and len(fields) == 4:
        return fields[3] == name
    return line.strip() == f"# {name}"


def _check(cfg: config_mod.Config, policy_dir: Path, edits: list[Edit]) -> None:
    """Refuse edits that leave a file the gateway or `airlock up` would refuse."""
    with tempfile.TemporaryDirectory(prefix="airlock-tenant-") as scratch:
        policy_copy = Path(scratch) / "policy"
        shutil.copytree(policy_dir, policy_copy, ignore=shutil.ignore_patterns("*.md"))
        config_copy = None
        for edit in edits:
            if edit.path.parent.resolve() == policy_dir.resolve():
                (policy_copy / edit.path.name).write_text(edit.after, encoding="utf-8")
            else:
                config_copy = Path(scratch) / edit.path.name
                config_copy.write_text(edit.after, encoding="utf-8")
        try:
            load_checked(policy_copy)
        except PolicyError as exc:
            why = str(exc).replace(str(policy_copy), str(policy_dir))
            raise TenantEditError(f"the policy would not load: {why}") from None
        if config_copy is not None:
            try:
                config_mod.load(config_copy, state_dir=cfg.state_dir)
            except config_mod.ConfigError as exc:
                raise TenantEditError(f"the configuration would not load: {exc.key}: {exc.reason}") from None
