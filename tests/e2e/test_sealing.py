"""Sealing on live stacks: workers take only sealed prompts, keys go only to workers whose evidence
meets the tenant's policy, end-to-end mode keeps the gateway out, tampering is refused and audited,
and a key rotation under load loses no request."""

from __future__ import annotations

import asyncio
import textwrap

import grpc
import pytest

from airlock import AsyncClient, AttestationError
from airlock.attestation import AttestationPolicy
from airlock.e2e import EndToEnd
from airlock.envelope import SealError
from airlock.sealing import open_prompt, request_key
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from gateway.keys import open_keystore
from tests.conftest import ECHO_TOML, make_policy_dir
from tests.support import DOORS, LiveStack

E2E = AttestationPolicy(min_level="software")


def _e2e_client(live: LiveStack, tenant: str = "acme", **options: object) -> AsyncClient:
    return AsyncClient(live.address, token=live.token(tenant), ca_cert=live.pki.ca_cert,
                       worker_ca=live.pki.attest_ca_cert, end_to_end=options.pop("policy", E2E), **options)  # type: ignore[arg-type]  # fmt: skip


async def test_a_worker_refuses_a_plaintext_prompt_even_from_the_gateway(echo_stack: LiveStack) -> None:
    request = worker_pb2.WorkerRequest(
        tenant="acme",
        request=pb.GenerateRequest(model="echo", messages=[pb.ChatMessage(role="user", content="x")]),
    )
    async with echo_stack.worker_channel("acme", "echo") as channel:  # the gateway's own certificate
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sealed" in (err.value.details() or "")


@pytest.mark.parametrize("door", DOORS)
async def test_keys_are_released_after_attestation_and_audited(echo_stack: LiveStack, door: str) -> None:
    # Through either door the prompt reaches the worker sealed (it refuses any other, above).
    token = echo_stack.token("globex")
    assert await echo_stack.generate(door, token, prompt="sealed on the way") == "sealed on the way"
    releases = echo_stack.audit_records(event="key_release", tenant="globex")
    assert releases and releases[-1]["level"] == "software"
    assert set(releases[-1]["measurements"]) == {"code", "config", "model"}
    assert all(k.startswith("globex-") for k in releases[-1]["key_ids"])


def _policy_toml(live_dir: object, attestation: str) -> str:
    policy = make_policy_dir(live_dir)  # type: ignore[arg-type]
    with (policy / "tenants.toml").open("a") as fh:
        fh.write(textwrap.dedent(attestation))
    return f'policy_dir = "{policy}"\n' + ECHO_TOML


async def test_evidence_below_the_tenant_policy_releases_no_key(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = _policy_toml(tmp_path / "policy", """
        [tenants.globex.attestation]
        min_level = "nvidia-cc"
    """)  # fmt: skip
    live: LiveStack = make_stack(toml)
    async with live.client("globex") as globex, live.client("acme") as acme:
        with pytest.raises(AttestationError) as err:
            await globex.generate("never sealed for this worker", model="echo")
        assert err.value.reason == "ATTESTATION_INSUFFICIENT"
        assert (await acme.generate("acme is fine", model="echo")).text == "acme is fine"
    refused = live.audit_records(event="attestation", tenant="globex")
    assert refused and refused[-1]["reason"] == "ATTESTATION_INSUFFICIENT"
    assert not live.audit_records(event="key_release", tenant="globex", request_id=err.value.request_id)


async def test_an_unexpected_measurement_releases_no_key(make_stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = _policy_toml(tmp_path / "policy", f"""
        [tenants.globex.attestation]
        measurements.code = ["{"ab" * 32}"]
    """)  # fmt: skip
    live: LiveStack = make_stack(toml)
    async with live.client("globex") as globex:
        with pytest.raises(AttestationError) as err:
            await globex.generate("hi", model="echo")
    assert err.value.reason == "ATTESTATION_MEASUREMENT"


async def test_end_to_end_mode_answers_and_the_gateway_cannot_open_it(echo_stack: LiveStack) -> None:
    async with _e2e_client(echo_stack) as client:
        verified = await client.attestation("echo")
        assert verified.level == "software" and verified.model == "echo"
        answer = await client.generate("only the worker reads this", model="echo")
        streamed = [c async for c in client.stream("nor this, chunk by chunk", model="echo")]
    assert answer.text == "only the worker reads this"
    assert "".join(c.text for c in streamed) == "nor this, chunk by chunk"

    # Everything the gateway holds: every tenant key in its keystore. None opens an e2e prompt.
    async with echo_stack.client() as plain:
        e2e = EndToEnd(
            plain._fetch_attestation, ca_pem=echo_stack.pki.attest_ca_cert.read_bytes(), policy=E2E
        )
        prompt = pb.GenerateRequest(request_id="e2e-capture", model="echo",
                                    messages=[pb.ChatMessage(role="user", content="captured")])  # fmt: skip
        sealed, _ = await e2e.seal(prompt, "acme")
    keystore = open_keystore(echo_stack.config.keys, echo_stack.config.state_dir)
    for key_id, key in keystore.usable("acme").items():
        for claimed in (key_id, "e2e"):
            with pytest.raises(SealError):
                open_prompt(
                    sealed.sealed_messages, request_key("acme", claimed, sealed.request_id, "echo"), key
                )
    assert b"captured" not in sealed.SerializeToString()


async def test_a_tampered_end_to_end_prompt_is_refused_and_audited(echo_stack: LiveStack) -> None:
    async with echo_stack.client() as plain:
        e2e = EndToEnd(
            plain._fetch_attestation, ca_pem=echo_stack.pki.attest_ca_cert.read_bytes(), policy=E2E
        )
        prompt = pb.GenerateRequest(request_id="tamper-rid", model="echo",
                                    messages=[pb.ChatMessage(role="user", content="hello")])  # fmt: skip
        sealed, _ = await e2e.seal(prompt, "acme")
    ciphertext = bytearray(sealed.sealed_messages.ciphertext)
    ciphertext[-1] ^= 0x01
    sealed.sealed_messages.ciphertext = bytes(ciphertext)
    credentials = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(echo_stack.address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inference_pb2_grpc.InferenceStub(channel).Generate(
                sealed, metadata=[("authorization", f"Bearer {echo_stack.token()}")], timeout=10
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert b"SEAL_TAMPERED" in dict(err.value.trailing_metadata())["grpc-status-details-bin"]  # type: ignore[operator]
    [record] = echo_stack.audit_records(event="request", request_id="tamper-rid")
    assert record["code"] == "INVALID_ARGUMENT"
    [integrity] = echo_stack.audit_records(event="integrity", request_id="tamper-rid")
    assert integrity["reason"] == "SEAL_TAMPERED" and integrity["tenant"] == "acme"
    async with echo_stack.client() as client:  # nothing crashed
        assert (await client.generate("still serving", model="echo")).text == "still serving"


async def test_end_to_end_evidence_is_checked_by_the_client(echo_stack: LiveStack) -> None:
    strict = AttestationPolicy(measurements={"model": ("0" * 64,)})
    async with _e2e_client(echo_stack, policy=strict) as client:
        with pytest.raises(AttestationError) as err:
            await client.generate("never sent", model="echo")
    assert err.value.reason == "ATTESTATION_MEASUREMENT"


async def test_a_restarted_worker_is_attested_again_in_both_modes(make_stack) -> None:  # type: ignore[no-untyped-def]
    live: LiveStack = make_stack()
    async with _e2e_client(live, "globex") as e2e, live.client("globex") as plain:
        assert (await e2e.generate("before", model="echo")).text == "before"
        assert (await plain.generate("before", model="echo")).text == "before"
        argv = live.kill_worker("globex", "echo")
        live.restart_worker("globex", "echo", argv)
        for _ in range(200):  # until the restarted worker is ready again
            if await live.health("tenant/globex") == "SERVING":
                break
            await asyncio.sleep(0.05)
        # The new worker has a new HPKE key and no tenant keys: the gateway re-attests and releases
        # (KEYS_MISSING), the SDK re-attests for end to end (ATTESTATION_STALE); neither call fails.
        assert (await plain.generate("after", model="echo")).text == "after"
        assert (await e2e.generate("after", model="echo")).text == "after"
    workers = {r["worker_id"] for r in live.audit_records(event="key_release", tenant="globex")}
    assert len(workers) >= 2


async def test_rotating_the_tenant_key_under_load_loses_no_request(make_stack) -> None:  # type: ignore[no-untyped-def]
    live: LiveStack = make_stack()
    keystore = open_keystore(live.config.keys, live.config.state_dir)  # another process, as `airlock keys` is
    before = keystore.active("acme")[0]

    words = " ".join(f"w{j}" for j in range(30))  # 1.5 s at the slow model's 20 tokens/s

    async def one(client: AsyncClient, i: int) -> str:
        return "".join([c.text async for c in client.stream(f"request {i} {words}", model="slow")])

    async with live.client("acme") as client:
        calls = [asyncio.ensure_future(one(client, i)) for i in range(12)]
        await asyncio.sleep(0.5)
        assert not any(c.done() for c in calls)  # rotate while they stream
        keystore.rotate("acme")  # in-flight streams keep their key (decrypt-only), new ones get the new
        await asyncio.sleep(1.5)  # the gateway notices within about a second
        calls += [asyncio.ensure_future(one(client, i)) for i in range(12, 18)]
        answers = await asyncio.gather(*calls)
    assert answers == [f"request {i} {words}" for i in range(18)]
    after = keystore.active("acme")[0]
    assert after != before
    released = [r["key_ids"] for r in live.audit_records(event="key_release", tenant="acme")]
    assert any(before in ids and after in ids for ids in released), released


def test_sealing_config_refuses_unknown_attestation_level(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.policy.rules import PolicyError, load_policy

    policy = make_policy_dir(tmp_path / "p")
    with (policy / "tenants.toml").open("a") as fh:
        fh.write('\n[tenants.acme.attestation]\nmin_level = "trust-me"\n')
    with pytest.raises(PolicyError, match="min_level"):
        load_policy(policy)


async def test_invalid_nonce_for_attestation_is_refused(echo_stack: LiveStack) -> None:
    credentials = grpc.ssl_channel_credentials(echo_stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(echo_stack.address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inference_pb2_grpc.InferenceStub(channel).GetAttestation(
                pb.AttestationRequest(model="echo", nonce=b"short"),
                metadata=[("authorization", f"Bearer {echo_stack.token()}")], timeout=10,
            )  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_classic_x25519_suite_is_configurable(make_stack) -> None:  # type: ignore[no-untyped-def]
    live: LiveStack = make_stack('[sealing]\nhpke_suite = "x25519"\n' + ECHO_TOML)
    classic = AttestationPolicy(suites=("x25519",))  # what this deployment chose, accepted explicitly
    async with live.client("globex") as client, _e2e_client(live, "globex", policy=classic) as e2e:
        assert (await client.generate("classic", model="echo")).text == "classic"
        assert (await e2e.attestation("echo")).hpke_suite == "x25519"
    released = live.audit_records(event="key_release", tenant="globex")
    assert released[-1]["suite"] == "x25519"


async def test_end_to_end_refuses_a_suite_it_did_not_accept(make_stack) -> None:  # type: ignore[no-untyped-def]
    live: LiveStack = make_stack('[sealing]\nhpke_suite = "x25519"\n' + ECHO_TOML)
    async with _e2e_client(live, "globex") as e2e:  # default: the post-quantum hybrid only
        with pytest.raises(AttestationError) as err:
            await e2e.generate("never sealed over a downgraded suite", model="echo")
    assert err.value.reason == "ATTESTATION_SUITE"


def test_end_to_end_needs_the_worker_attestation_ca(echo_stack: LiveStack) -> None:
    with pytest.raises(ValueError, match="worker_ca"):
        AsyncClient(echo_stack.address, token="t", ca_cert=echo_stack.pki.ca_cert, end_to_end=E2E)
