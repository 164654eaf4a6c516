"""Each common connection mistake, through the SDK and through the `airlock` command: one sentence
that names the address and what to check, and no gRPC C-core log lines in the command's output.
Also the errors of a call that did reach the gateway: a tenant typo, an unknown model."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from airlock import AsyncClient, AuthenticationError, InvalidRequestError, UnavailableError
from control.pki import ensure_dev_pki
from tests.e2e.cli_stack import AIRLOCK
from tests.support import LiveStack


@pytest.fixture(scope="module")
def plaintext_port() -> Iterator[int]:
    server, thread = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    yield int(server.server_address[1])
    server.shutdown()
    thread.join()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Mistakes = dict[str, tuple[str, dict[str, object], str]]
REASONS = ["CONNECT_REFUSED", "TLS_UNTRUSTED", "TLS_CLIENT_CERT_REQUIRED", "TLS_NOT_SPOKEN"]


def mistakes(live: LiveStack, other_ca: Path, plaintext: int) -> Mistakes:
    """name -> (address, client options, the message's start)"""
    mtls, address = live.stack.mtls_address, live.address
    assert mtls is not None
    untrusted = f"the certificate of {address} is not signed by the CA in {other_ca}"
    no_cert = f"{mtls} closed the connection during the TLS handshake: it wants a client certificate"
    return {
        "CONNECT_REFUSED": (f"127.0.0.1:{free_port()}", {}, "nothing is listening on 127.0.0.1:"),
        "TLS_UNTRUSTED": (address, {"ca_cert": other_ca}, untrusted),
        "TLS_CLIENT_CERT_REQUIRED": (mtls, {}, no_cert),
        "TLS_NOT_SPOKEN": (f"127.0.0.1:{plaintext}", {}, f"127.0.0.1:{plaintext} does not speak TLS"),
    }


@pytest.mark.parametrize("reason", REASONS)
async def test_each_mistake_is_one_sentence_in_the_sdk(
    echo_stack: LiveStack, tmp_path: Path, plaintext_port: int, reason: str
) -> None:
    other = ensure_dev_pki(tmp_path).ca_cert  # the CA of another state directory
    address, options, message = mistakes(echo_stack, other, plaintext_port)[reason]
    options = {"ca_cert": echo_stack.pki.ca_cert, **options}
    async with AsyncClient(address, token=echo_stack.token(), retries=0, **options) as client:  # type: ignore[arg-type]
        with pytest.raises(UnavailableError) as failed:
            await client.generate("hi", model="echo", timeout=10)
    assert failed.value.reason == reason
    assert failed.value.message.startswith(message), failed.value.message
    assert "\n" not in failed.value.message and "TSI_" not in failed.value.message


@pytest.mark.parametrize("reason", REASONS)
def test_each_mistake_is_one_line_from_the_command(
    echo_stack: LiveStack, tmp_path: Path, plaintext_port: int, reason: str
) -> None:
    other = ensure_dev_pki(tmp_path).ca_cert
    address, options, message = mistakes(echo_stack, other, plaintext_port)[reason]
    ca = str(options.get("ca_cert", echo_stack.pki.ca_cert))
    state = str(echo_stack.config.state_dir)
    done = subprocess.run(
        [*AIRLOCK, "generate", "--tenant", "acme", "--model", "echo", "--address", address, "--ca", ca,
         "--state-dir", state, "hi"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no "E0000 … ssl_transport_security.cc" lines from gRPC
    assert lines[0].startswith(f"airlock: cannot reach the gateway: UNAVAILABLE {reason}: {message}")
    assert "(request id " in lines[0]
    if reason == "TLS_UNTRUSTED":
        assert f"the development CA of {state} is {state}/pki/ca.crt" in lines[0]


def test_grpc_logging_is_silenced_whatever_the_environment_says(
    echo_stack: LiveStack, tmp_path: Path
) -> None:
    other = ensure_dev_pki(tmp_path).ca_cert
    done = subprocess.run(
        [*AIRLOCK, "generate", "--tenant", "acme", "--address", echo_stack.address,
         "--ca", str(other), "--state-dir", str(echo_stack.config.state_dir), "hi"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "GRPC_VERBOSITY": "INFO"},
    )  # fmt: skip
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_verbose_lets_grpc_log(echo_stack: LiveStack, tmp_path: Path) -> None:
    other = ensure_dev_pki(tmp_path).ca_cert
    done = subprocess.run(
        [*AIRLOCK, "--verbose", "generate", "--tenant", "acme", "--address", echo_stack.address,
         "--ca", str(other), "--state-dir", str(echo_stack.config.state_dir), "hi"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "GRPC_VERBOSITY": "INFO"},
    )  # fmt: skip
    assert done.returncode == 1 and "TLS_UNTRUSTED" in done.stderr
    assert "ssl_transport_security" in done.stderr  # gRPC's own lines too


async def test_a_tenant_typo_is_not_served_here(echo_stack: LiveStack) -> None:
    async with echo_stack.client("acmee", retries=0) as client:
        with pytest.raises(AuthenticationError) as refused:
            await client.generate("hi", model="echo")
    assert refused.value.reason == "TOKEN_TENANT_UNKNOWN"
    assert refused.value.message == "tenant 'acmee' is not served here"


async def test_an_unknown_model_names_the_one_asked_and_those_the_caller_may_use(
    echo_stack: LiveStack,
) -> None:
    async with echo_stack.client("globex") as client:
        with pytest.raises(InvalidRequestError) as refused:
            await client.generate("hi", model="ech0")
    assert refused.value.reason == "UNKNOWN_MODEL"
    assert refused.value.message == "unknown model 'ech0'; the models you may use: echo"


async def test_an_uppercase_tenant_header_says_names_are_lowercase(echo_stack: LiveStack) -> None:
    from airlock import AsyncClient, PermissionDeniedError

    token = echo_stack.token("acme")
    async with AsyncClient(
        echo_stack.address, token=token, ca_cert=echo_stack.pki.ca_cert, tenant="ACME"
    ) as client:
        with pytest.raises(PermissionDeniedError) as refused:
            await client.generate("hi", model="echo")
    assert refused.value.reason == "TENANT_INVALID"
    assert "tenant names are lowercase letters, digits and '-'" in refused.value.message
