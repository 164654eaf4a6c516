"""`airlock keys` as an operator runs it: real subprocesses, real files, both backends."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.keystore_site import Site, make_site


@pytest.fixture(params=["file", "pkcs11"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return make_site(request, tmp_path)


def ok(site: Site, *args: str) -> str:
    result = site.cli("keys", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(listing: str) -> list[list[str]]:
    lines = listing.strip().splitlines()
    assert lines[0].split() == ["TENANT", "KEY", "ID", "STATE", "CREATED", "(UTC)", "BACKEND"]
    return [line.split() for line in lines[1:]]


def test_create_rotate_retire_and_list(site: Site) -> None:
    assert "(no keys)" in ok(site, "list")
    created = ok(site, "create", "--tenant", "acme")
    first = re.search(r"created key (acme-k[0-9a-f]{8}) of tenant acme: now active", created)
    assert first, created
    ok(site, "create", "--tenant", "globex")

    rotated = ok(site, "rotate", "--tenant", "acme")
    second = re.search(r"rotated to key (acme-k[0-9a-f]{8})", rotated)
    assert second and f"previous key {first[1]}: now decrypt-only" in rotated

    table = rows(ok(site, "list", "--tenant", "acme"))
    # tenant, key id, state, date, time, backend
    assert [(r[0], r[1], r[2], r[5]) for r in table] == [
        ("acme", first[1], "decrypt-only", site.backend),
        ("acme", second[1], "active", site.backend),
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", table[0][3])
    assert {r[0] for r in rows(ok(site, "list"))} == {"acme", "globex"}

    retired = ok(site, "retire", "--tenant", "acme", "--key-id", first[1])
    assert f"retired key {first[1]} of tenant acme: now retired" in retired
    assert [r[2] for r in rows(ok(site, "list", "--tenant", "acme"))] == ["retired", "active"]

    # What the commands printed never contains a key, in any encoding.
    printed = created + rotated + retired + ok(site, "list")
    for key in site.open().usable("acme").values():
        assert key.hex() not in printed and base64.b64encode(key).decode() not in printed


def test_errors_exit_1_with_a_clear_message(site: Site) -> None:
    ok(site, "create", "--tenant", "acme")
    again = site.cli("keys", "create", "--tenant", "acme")
    assert again.returncode == 1 and "already has a key; use rotate" in again.stderr

    active = site.open().active("acme")[0]
    retire_active = site.cli("keys", "retire", "--tenant", "acme", "--key-id", active)
    assert retire_active.returncode == 1 and "rotate first" in retire_active.stderr

    unknown = site.cli("keys", "rotate", "--tenant", "initech")
    assert unknown.returncode == 1 and "has no key to rotate" in unknown.stderr

    bad = site.cli("keys", "create", "--tenant", "Bad Name")
    assert bad.returncode == 2 and "lowercase letters" in bad.stderr


def test_a_readable_master_key_stops_the_cli(tmp_path: Path) -> None:
    site = Site("file", tmp_path / "airlock.toml", tmp_path / "state")
    site.config.write_text('[models.echo]\nengine = "echo"\n[tenants.acme]\nmodels = ["echo"]\n')
    ok(site, "create", "--tenant", "acme")
    master = site.state_dir / "keys" / "master.key"
    master.chmod(0o644)
    result = site.cli("keys", "list")
    assert result.returncode == 1
    assert f"master key {master}: mode 0644" in result.stderr and "Traceback" not in result.stderr


def test_up_creates_a_key_for_each_tenant_that_has_none(tmp_path: Path) -> None:
    site = Site("file", tmp_path / "airlock.toml", tmp_path / "state")
    site.config.write_text(
        '[gateway]\nmtls_listen = ""\n[models.echo]\nengine = "echo"\n'
        '[tenants.acme]\nmodels = ["echo"]\n[tenants.globex]\nmodels = ["echo"]\n'
    )
    ok(site, "create", "--tenant", "acme")
    existing = site.open().active("acme")[0]
    up = subprocess.Popen(
        [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())", "up",
         "--listen", "127.0.0.1:0", "--config", str(site.config), "--state-dir", str(site.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        for line in up.stdout:  # the stack prints this once every part is serving
            if line.startswith("Airlock is up"):
                break
        else:
            pytest.fail(f"airlock up exited early: {up.stderr.read() if up.stderr else ''}")
    finally:
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=60)
    infos = site.open().list()
    assert [(i.tenant, i.state) for i in infos] == [("acme", "active"), ("globex", "active")]
    assert infos[0].key_id == existing  # a tenant that had a key keeps it
    assert f"created key {infos[1].key_id} for tenant globex" in stderr
    assert "for tenant acme" not in stderr
