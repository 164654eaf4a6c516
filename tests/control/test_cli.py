"""The `airlock` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jwt

from tests.support import LiveStack


def airlock(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bad_config_names_file_key_and_reason_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nmax_tokens = -3\n[models.m]\nengine="echo"\n[tenants.t]\nmodels=["m"]\n')
    result = airlock("up", "--config", str(bad), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "gateway.max_tokens" in result.stderr and "positive" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing was started or written


def test_token_command_mints_a_verifiable_token(tmp_path: Path) -> None:
    result = airlock(
        "token", "--tenant", "acme", "--subject", "alice", "--ttl", "60", "--state-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    jwks = jwt.PyJWKSet.from_json((tmp_path / "pki" / "jwks.json").read_text())
    claims = jwt.decode(
        token, jwks.keys[0].key, algorithms=["EdDSA"], audience="airlock", issuer="airlock-dev"
    )
    assert (claims["tenant"], claims["sub"]) == ("acme", "alice")
    assert claims["exp"] - claims["iat"] == 60


def test_generate_command_streams_and_reports_counts(echo_stack: LiveStack) -> None:
    result = airlock(
        "generate", "--tenant", "acme", "--model", "echo", "--address", echo_stack.address,
        "--state-dir", str(echo_stack.config.state_dir), "hello from the cli",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from the cli"
    assert "4 prompt + 4 completion tokens" in result.stderr and "tokens/s" in result.stderr


def test_generate_command_reports_errors_clearly(echo_stack: LiveStack) -> None:
    result = airlock(
        "generate", "--tenant", "acme", "--address", echo_stack.address, "--token", "garbage",
        "--state-dir", str(echo_stack.config.state_dir), "hi",
    )  # fmt: skip
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr and "TOKEN_MALFORMED" in result.stderr


async def test_cert_issues_a_service_identity_the_running_stack_accepts(
    echo_stack: LiveStack, tmp_path: Path
) -> None:
    from airlock import AsyncClient

    state = str(echo_stack.config.state_dir)
    result = airlock("cert", "--tenant", "acme", "--service", "batch", "--state-dir", state,
                     "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "spiffe://airlock.local/tenant/acme/svc/batch" in result.stdout
    address = echo_stack.stack.mtls_address
    assert address is not None
    async with AsyncClient(
        address, ca_cert=echo_stack.pki.ca_cert,
        client_cert=tmp_path / "acme-batch.crt", client_key=tmp_path / "acme-batch.key",
    ) as client:  # fmt: skip
        assert (await client.generate("as a service", model="echo")).text == "as a service"
    refused = airlock("cert", "--tenant", "Acme", "--service", "batch", "--state-dir", state)
    assert refused.returncode == 2 and "lowercase" in refused.stderr
