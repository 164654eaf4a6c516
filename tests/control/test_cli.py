"""The `airlock` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from control.cli import build_parser
from control.pki import ensure_dev_pki
from control.tokens import mint_dev_token
from gateway.config import AuthConfig
from tests.conftest import REPO_POLICY
from tests.support import LiveStack

AIRLOCK = [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())"]


def airlock(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AIRLOCK, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def test_bad_config_names_file_key_and_reason_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nmax_tokens = -3\n[models.m]\nengine="echo"\n[tenants.t]\nmodels=["m"]\n')
    result = airlock("up", "--config", str(bad), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "gateway.max_tokens" in result.stderr and "positive" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing was started or written


def test_token_command_mints_a_verifiable_token(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path)  # what `airlock up` made
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


# --- item 1: commands find the stack from the state directory, never guess ------------------------


@pytest.mark.parametrize("command", [["token", "--subject", "a"], ["cert", "--service", "batch"]])
def test_credentials_refuse_a_state_dir_without_a_pki_and_make_none(
    tmp_path: Path, command: list[str]
) -> None:
    state = tmp_path / "new"
    result = airlock(*command, "--tenant", "acme", "--state-dir", str(state))
    assert result.returncode == 1
    assert f"no development PKI in {state / 'pki'}" in result.stderr and "airlock up" in result.stderr
    assert not state.exists()  # no new PKI behind the operator's back


@pytest.mark.parametrize(
    "command", [["generate", "--tenant", "acme", "hi"], ["health"], ["status"], ["down"]]
)
def test_client_commands_without_a_running_stack_say_so(tmp_path: Path, command: list[str]) -> None:
    ensure_dev_pki(tmp_path)
    result = airlock(*command, "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"airlock: no running stack in {tmp_path}; start `airlock up` (or pass --state-dir of the one you "
        "started, or --address)"
    )


def test_a_stale_run_file_is_named_and_ignored(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stack.json").write_text('{"pid": 999999999, "address": "127.0.0.1:7443"}')
    result = airlock("generate", "--tenant", "acme", "hi", "--state-dir", str(tmp_path))
    assert result.returncode == 1 and "is stale: launcher pid 999999999 is gone" in result.stderr


# --- item 6: errors that say what to do -----------------------------------------------------------


def test_an_uppercase_tenant_says_names_are_lowercase(tmp_path: Path) -> None:
    result = airlock("token", "--tenant", "ACME", "--subject", "a", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert (
        "names are lowercase letters, digits and '-'" in result.stderr
        and "did you mean 'acme'?" in result.stderr
    )


def test_generate_refuses_a_token_of_another_tenant(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    globex = mint_dev_token(pki, AuthConfig(), tenant="globex", subject="cli")
    result = airlock("generate", "--tenant", "acme", "--token", globex, "--address", "127.0.0.1:1",
                     "--state-dir", str(tmp_path), "hi")  # fmt: skip
    assert result.returncode == 2
    assert "the token is for tenant 'globex', not 'acme' (--tenant)" in result.stderr


def test_generate_prints_the_request_id_with_every_error(echo_stack: LiveStack) -> None:
    result = airlock(
        "generate", "--tenant", "acme", "--model", "nope", "--address", echo_stack.address,
        "--state-dir", str(echo_stack.config.state_dir), "hi",
    )  # fmt: skip
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert "INVALID_ARGUMENT UNKNOWN_MODEL: unknown model 'nope'; the models you may use: echo, slow" in line
    assert "(request id " in line


# --- item 8: help, completion, defaults ------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"{prog} {action.option_strings or action.dest}"
        for prog, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not action.help
        and prog not in ("airlock domains", "airlock plan")  # the worker's own parsers answer --help
    ]  # fmt: skip
    assert missing == []


def test_help_shows_defaults_and_names_no_source_file() -> None:
    top = airlock("--help")
    assert top.returncode == 0 and ".py" not in top.stdout and "control/" not in top.stdout
    assert "airlock status | down | usage" in top.stdout
    gen = airlock("generate", "--help").stdout
    assert "(default: cli)" in gen and "(default: 128)" in gen  # the subject and max tokens


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_know_every_command(shell: str) -> None:
    result = airlock("completion", shell)
    assert result.returncode == 0
    for word in ("generate", "status", "tenant", "--max-tokens", "--state-dir"):
        assert word in result.stdout


def test_policy_lint_and_test_default_to_the_installations_policy_dir(tmp_path: Path) -> None:
    elsewhere = tmp_path  # not the repository: ./policy does not exist here
    for command in ("lint", "test"):
        result = airlock("policy", command, cwd=elsewhere)
        assert result.returncode == 0, result.stdout + result.stderr
        assert str(REPO_POLICY) in result.stdout
