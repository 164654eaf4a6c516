"""Service-to-service mTLS on the gateway's service port: identity only from a verified certificate."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from airlock import AsyncClient, AuthenticationError, PermissionDeniedError, UnavailableError
from control.pki import issue_service_cert
from tests.security.certs import client_cert, make_ca, service_ca
from tests.support import LiveStack

BATCH = "spiffe://airlock.local/tenant/acme/svc/batch"  # a service role in the repository policy


def service_client(stack: LiveStack, cert: Path, key: Path, **options: object) -> AsyncClient:
    address = stack.stack.mtls_address
    assert address is not None
    return AsyncClient(address, ca_cert=stack.pki.ca_cert, client_cert=cert, client_key=key, **options)  # type: ignore[arg-type]


async def test_a_service_certificate_authenticates_and_the_policy_applies(
    echo_stack: LiveStack, tmp_path: Path
) -> None:
    issued = issue_service_cert(echo_stack.pki, tenant="acme", service="batch", out_dir=tmp_path)
    assert issued.spiffe_id == BATCH
    async with service_client(echo_stack, issued.cert, issued.key) as client:
        assert (await client.generate("from a service", model="echo")).text == "from a service"
        assert await client.list_models() == ["echo", "slow"]
        # The policy lets services generate, not stream.
        with pytest.raises(PermissionDeniedError) as err:
            [c async for c in client.stream("no", model="echo")]
    assert err.value.reason == "POLICY_DENIED"


async def test_a_service_may_not_act_for_another_tenant(echo_stack: LiveStack, tmp_path: Path) -> None:
    issued = issue_service_cert(echo_stack.pki, tenant="acme", service="batch", out_dir=tmp_path)
    async with service_client(echo_stack, issued.cert, issued.key, tenant="globex") as client:
        with pytest.raises(PermissionDeniedError) as err:
            await client.generate("hi", model="echo")
    assert err.value.reason == "POLICY_DENIED"


async def test_a_service_without_a_policy_role_is_denied(echo_stack: LiveStack, tmp_path: Path) -> None:
    issued = issue_service_cert(echo_stack.pki, tenant="acme", service="unknown", out_dir=tmp_path)
    async with service_client(echo_stack, issued.cert, issued.key) as client:
        with pytest.raises(PermissionDeniedError):
            await client.generate("hi", model="echo")


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "CERT_NO_SPIFFE_ID"),
        (["https://acme.example/batch"], "CERT_NO_SPIFFE_ID"),
        ([BATCH, "spiffe://airlock.local/tenant/globex/svc/batch"], "CERT_NO_SPIFFE_ID"),
        (["spiffe://other.domain/tenant/acme/svc/batch"], "CERT_BAD_TRUST_DOMAIN"),
        (["spiffe://airlock.local/tenant/acme"], "CERT_BAD_SPIFFE_ID"),
        (["spiffe://airlock.local/tenant/ACME/svc/batch"], "CERT_BAD_SPIFFE_ID"),
    ],
)
async def test_a_trusted_certificate_without_a_valid_spiffe_id_is_unauthenticated(
    echo_stack: LiveStack, tmp_path: Path, uris: list[str], reason: str
) -> None:
    cert, key = client_cert(tmp_path, service_ca(echo_stack.pki), uris=uris)
    async with service_client(echo_stack, cert, key) as client:
        with pytest.raises(AuthenticationError) as err:
            await client.generate("hi", model="echo")
    assert err.value.reason == reason


async def test_certificate_plus_token_is_ambiguous(echo_stack: LiveStack, tmp_path: Path) -> None:
    issued = issue_service_cert(echo_stack.pki, tenant="acme", service="batch", out_dir=tmp_path)
    async with service_client(echo_stack, issued.cert, issued.key, token=echo_stack.token("globex")) as c:
        with pytest.raises(AuthenticationError) as err:
            await c.generate("hi", model="echo")
    assert err.value.reason == "IDENTITY_AMBIGUOUS"


def _refused_at_handshake(stack: LiveStack, cert: Path, key: Path) -> grpc.StatusCode:
    """The TLS handshake refuses these certificates: no call reaches the server at all."""
    address = stack.stack.mtls_address
    assert address is not None
    credentials = grpc.ssl_channel_credentials(
        stack.pki.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    with grpc.secure_channel(address, credentials) as channel:
        call = channel.unary_unary("/airlock.v1.Inference/ListModels")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
    return err.value.code()  # type: ignore[no-any-return, attr-defined]


async def test_certificates_from_another_ca_expired_or_absent_never_get_a_call_through(
    echo_stack: LiveStack, tmp_path: Path
) -> None:
    pki = echo_stack.pki
    foreign = client_cert(tmp_path / "f", make_ca("attacker CA"), uris=[BATCH])
    expired = client_cert(tmp_path / "e", service_ca(pki), uris=[BATCH], expired=True)
    # The gateway's own and the workers' certificates come from the internal CA, not the service CA.
    for cert, key in (foreign, expired, (pki.worker_cert, pki.worker_key)):
        assert _refused_at_handshake(echo_stack, cert, key) == grpc.StatusCode.UNAVAILABLE
    # No certificate at all: the service port requires one.
    address = echo_stack.stack.mtls_address
    assert address is not None
    async with AsyncClient(address, ca_cert=pki.ca_cert, token=echo_stack.token()) as client:
        with pytest.raises(UnavailableError):
            await client.generate("hi", model="echo", timeout=5)


async def test_the_token_port_ignores_client_certificates(echo_stack: LiveStack, tmp_path: Path) -> None:
    # A service certificate presented on the token port is not asked for, so it is no identity there.
    issued = issue_service_cert(echo_stack.pki, tenant="acme", service="batch", out_dir=tmp_path)
    async with AsyncClient(
        echo_stack.address, ca_cert=echo_stack.pki.ca_cert, client_cert=issued.cert, client_key=issued.key
    ) as client:
        with pytest.raises(AuthenticationError) as err:
            await client.generate("hi", model="echo")
    assert err.value.reason == "TOKEN_MISSING"
