"""`airlock audit verify` and `airlock bundle keygen|create|sign|verify` from the command line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from control.cli import main
from control.pki import ensure_dev_pki
from gateway.audit import AuditLog, load_signing_key
from tests.support import LiveStack


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_audit_verify_passes_then_catches_an_edit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = ensure_dev_pki(tmp_path)
    path = tmp_path / "audit" / "gateway.jsonl"
    log = AuditLog(path, signing_key=load_signing_key(pki.audit_key))
    for subject in ("acme/a", "acme/b", "acme/c"):
        log.record("authorization", decision="deny", subject=subject)
    log.close()
    code, out = run(capsys, "audit", "verify", "--state-dir", str(tmp_path))  # default dir and dev key
    assert code == 0, out
    assert f"OK {path}: 3 record(s) in 1 file(s), 1 signature(s)" in out
    path.write_text(path.read_text().replace('"decision":"deny"', '"decision":"allow"'))
    code, out = run(capsys, "audit", "verify", "--file", str(path), "--key", str(pki.audit_pub),
                    "--state-dir", str(tmp_path))  # fmt: skip
    assert code == 1
    assert "FAIL" in out and "record seq 0 was modified" in out


def test_audit_verify_without_a_log_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, "audit", "verify", "--dir", str(tmp_path / "empty"), "--state-dir", str(tmp_path))
    assert code == 2 and "no audit log" in out


def test_bundle_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"w" * 64)
    key = tmp_path / "keys" / "release.key"
    assert run(capsys, "bundle", "keygen", "--out", str(key))[0] == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert run(capsys, "bundle", "keygen", "--out", str(key))[0] == 2  # never overwrite a key
    assert run(capsys, "bundle", "create", str(model), "--name", "m1")[0] == 0
    state = ["--state-dir", str(tmp_path / "state")]
    assert run(capsys, "bundle", "sign", str(model), "--key", str(key), *state)[0] == 0
    trusted = ["--trusted-keys", f"{key}.pub"]
    code, out = run(capsys, "bundle", "verify", str(model), *trusted, *state)
    assert code == 0 and "OK" in out and "'m1', 2 file(s)" in out
    code, out = run(capsys, "bundle", "verify", str(model), *state)  # the dev keys don't trust it
    assert code == 1 and "BUNDLE_KEY_UNTRUSTED" in out
    (model / "weights.bin").write_bytes(b"x" * 64)
    code, out = run(capsys, "bundle", "verify", str(model), *trusted, *state)
    assert code == 1 and "weights.bin differs" in out and "BUNDLE_FILE_ALTERED" in out


def test_health_probe(echo_stack: LiveStack, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(echo_stack.config.state_dir)]
    code, out = run(capsys, "health", "--address", echo_stack.address, *state)
    assert (code, out.strip()) == (0, "SERVING")
    port = echo_stack.address.rsplit(":", 1)[1]
    assert run(capsys, "health", "--address", f"0.0.0.0:{port}", *state)[0] == 0  # wildcard: loopback
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free = unused.getsockname()[1]
    code, out = run(capsys, "health", "--address", f"127.0.0.1:{free}", "--timeout", "2", *state)
    assert code == 1 and "CONNECT_REFUSED: nothing is listening on" in out


def test_health_probe_of_a_tenant_needs_that_tenants_credential(
    echo_stack: LiveStack, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--address", echo_stack.address, "--state-dir", str(echo_stack.config.state_dir)]
    code, out = run(capsys, "health", *where, "--service", "tenant/acme")
    assert code == 1 and "UNAUTHENTICATED" in out
    code, out = run(capsys, "health", *where, "--service", "tenant/acme", "--token", echo_stack.token("acme"))
    assert (code, out.strip()) == (0, "SERVING")
    code, out = run(
        capsys, "health", *where, "--service", "tenant/acme", "--token", echo_stack.token("globex")
    )
    assert code == 1 and "NOT_FOUND" in out
