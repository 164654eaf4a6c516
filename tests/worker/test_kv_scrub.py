"""KV scrubbing on a shared engine: the tenant gate's ordering, and VllmEngine around it with a fake
in place of vLLM's AsyncLLM (the real engine needs vLLM and a GPU; see test_vllm_engine.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from airlock.errors import UnavailableError
from airlock.types import GenerationSpec, Message, Sampling
from worker.engines import vllm as vllm_engine
from worker.engines.kv_scrub import KV_SCRUB_METHOD, KvScrubExtension, TenantGate, zero_tensors
from worker.engines.vllm import VllmEngine, VllmSettings, cache_salt


def test_zero_tensors_reaches_every_tensor_and_counts_bytes() -> None:
    caches: Any = [torch.ones(4, 4), (torch.ones(2, dtype=torch.float16), {"v": torch.ones(3)}), "x"]
    assert zero_tensors(caches) == 4 * 4 * 4 + 2 * 2 + 3 * 4
    assert all(not t.any() for t in (caches[0], caches[1][0], caches[1][1]["v"]))


def test_the_worker_extension_zeroes_the_model_runners_kv_caches() -> None:
    @dataclass
    class Runner:
        kv_caches: list[torch.Tensor] = field(default_factory=lambda: [torch.ones(8), torch.ones(8)])

    class FakeWorker(KvScrubExtension):  # vLLM mixes the extension into its worker class likewise
        model_runner = Runner()

    worker = FakeWorker()
    assert getattr(worker, KV_SCRUB_METHOD)() == 2 * 8 * 4
    assert not any(t.any() for t in worker.model_runner.kv_caches)
    with pytest.raises(RuntimeError, match="no model runner"):
        KvScrubExtension().airlock_zero_kv_cache()


def test_only_a_shared_scrubbing_engine_asks_vllm_for_the_extension() -> None:
    shared = VllmSettings(Path("/m"), isolation="shared").engine_args()
    assert shared["worker_extension_cls"] == "worker.engines.kv_scrub.KvScrubExtension"
    assert "worker_extension_cls" not in VllmSettings(Path("/m")).engine_args()
    assert (
        "worker_extension_cls" not in VllmSettings(Path("/m"), isolation="shared", scrub="off").engine_args()
    )


# -- the gate ---------------------------------------------------------------------------------------


async def test_a_tenant_switch_waits_for_the_previous_tenant_then_scrubs_once() -> None:
    log: list[str] = []

    async def scrub() -> None:
        log.append(f"scrub(running={gate.running})")

    gate = TenantGate(scrub)
    a_done, a2_admitted = asyncio.Event(), asyncio.Event()

    async def run(tenant: str, name: str, hold: asyncio.Event | None = None) -> None:
        async with gate.enter(tenant):
            log.append(f"start {name}")
            if hold is not None:
                await hold.wait()
            log.append(f"end {name}")

    a1 = asyncio.create_task(run("acme", "a1", a_done))
    a2 = asyncio.create_task(run("acme", "a2", a2_admitted))  # same tenant: runs alongside a1
    await asyncio.sleep(0.01)
    b1 = asyncio.create_task(run("globex", "b1"))
    await asyncio.sleep(0.01)
    a3 = asyncio.create_task(run("acme", "a3"))  # arrives after b1 waits: queues behind it (no starvation)
    await asyncio.sleep(0.01)
    assert log == ["start a1", "start a2"]
    a_done.set()
    await asyncio.sleep(0.01)
    assert "start b1" not in log  # a2 is still in flight
    a2_admitted.set()
    await asyncio.gather(a1, a2, b1, a3)
    assert log[log.index("end a2") + 1 :] == [
        "scrub(running=0)", "start b1", "end b1", "scrub(running=0)", "start a3", "end a3",
    ]  # fmt: skip
    assert gate.switches == 2 and gate.owner == "acme" and gate.running == 0


async def test_a_failed_scrub_fails_the_switch_and_keeps_the_engine_closed_to_that_tenant() -> None:
    attempts = 0

    async def scrub() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise UnavailableError("no", reason="KV_SCRUB_FAILED")

    gate = TenantGate(scrub)
    async with gate.enter("acme"):
        pass
    with pytest.raises(UnavailableError):
        async with gate.enter("globex"):
            raise AssertionError("globex must not run on an unscrubbed engine")
    assert gate.owner == "acme" and gate.running == 0
    async with gate.enter("globex"):  # the next switch scrubs again
        assert attempts == 2 and gate.owner == "globex"


async def test_a_cancelled_waiter_does_not_block_the_queue() -> None:
    gate = TenantGate(lambda: asyncio.sleep(0))
    hold = asyncio.Event()

    async def acme() -> None:
        async with gate.enter("acme"):
            await hold.wait()

    async def globex() -> None:
        async with gate.enter("globex"):
            pass

    first = asyncio.create_task(acme())
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(globex())
    await asyncio.sleep(0.01)
    waiting.cancel()
    hold.set()
    await first
    await asyncio.wait_for(acme(), 5)  # acme again: nothing left queued ahead of it
    assert gate.switches == 0


# -- VllmEngine with a fake AsyncLLM -------------------------------------------------------------------


@dataclass
class _Piece:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Out:
    outputs: list[_Piece]
    finished: bool


class FakeAsyncLLM:
    """Records what VllmEngine asks of vLLM's AsyncLLM, in order; each request waits for its release."""

    def __init__(self, *, reset_ok: bool = True) -> None:
        self.log: list[tuple[str, ...]] = []
        self.reset_ok = reset_ok
        self.release: dict[str, asyncio.Event] = {}

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[_Out]:
        self.log.append(("generate", prompt.get("cache_salt", "-")))
        yield _Out([_Piece("hi", [1])], finished=False)
        await self.release.setdefault(prompt["tag"], asyncio.Event()).wait()
        yield _Out([_Piece("", [], "stop")], finished=True)

    async def reset_prefix_cache(self) -> bool:
        self.log.append(("reset_prefix_cache",))
        return self.reset_ok

    async def collective_rpc(self, method: str) -> list[int]:
        self.log.append(("collective_rpc", method))
        return [1 << 20, 1 << 20]  # two tensor-parallel workers

    async def abort(self, request_id: Any) -> None:
        self.log.append(("abort",))

    def shutdown(self) -> None:
        pass


class FakeTokenizer:
    """No added tokens, so nothing to keep out of a prompt (tests/security covers that)."""

    added_tokens_decoder: dict[int, Any] = {}  # noqa: RUF012

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, sanitize_control_tokens: bool = False, **kwargs: Any
    ) -> list[int]:
        return [len(messages[-1]["content"])]

    def get_chat_template(self) -> str:
        return ""

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return []


def _spec(tag: str) -> GenerationSpec:
    return GenerationSpec(tag, "m", (Message("user", tag),), Sampling(8, temperature=0.0))


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """SamplingParams come from vLLM; the fake takes the tag it needs through the prompt instead."""
    monkeypatch.setattr(VllmEngine, "_params", staticmethod(lambda spec: {"max_tokens": 8}))
    original = VllmEngine.prompt_for

    def prompt_for(self: VllmEngine, spec: GenerationSpec, tenant: str) -> dict[str, Any]:
        return {**original(self, spec, tenant), "tag": spec.request_id}

    monkeypatch.setattr(VllmEngine, "prompt_for", prompt_for)


def _engine(fake: FakeAsyncLLM, **settings: Any) -> VllmEngine:
    return VllmEngine(VllmSettings(Path("/m"), **settings), tenant="acme", salt_key=b"k" * 32, engine=fake,
                      tokenizer=FakeTokenizer())  # fmt: skip


async def _collect(engine: VllmEngine, tag: str, tenant: str) -> str:
    return "".join([o.text async for o in engine.generate(_spec(tag), tenant=tenant)])


@pytest.mark.usefixtures("fake_vllm")
async def test_shared_engine_salts_per_tenant_and_scrubs_kv_between_tenants() -> None:
    fake = FakeAsyncLLM()
    engine = _engine(fake, isolation="shared", scrub="tenant-switch")
    a = asyncio.create_task(_collect(engine, "a", "acme"))
    await asyncio.sleep(0.01)
    b = asyncio.create_task(_collect(engine, "b", "globex"))
    await asyncio.sleep(0.01)
    assert fake.log == [("generate", cache_salt(b"k" * 32, "acme"))]  # globex waits for acme's request
    fake.release["a"].set()
    await asyncio.sleep(0.01)
    fake.release["b"].set()
    assert await asyncio.gather(a, b) == ["hi", "hi"]
    assert fake.log == [
        ("generate", cache_salt(b"k" * 32, "acme")),
        ("reset_prefix_cache",),
        ("collective_rpc", KV_SCRUB_METHOD),
        ("generate", cache_salt(b"k" * 32, "globex")),
    ]
    assert engine.zeroed_kv_bytes == 2 << 20


@pytest.mark.usefixtures("fake_vllm")
async def test_an_abandoned_request_is_aborted_before_the_switch() -> None:
    fake = FakeAsyncLLM()
    engine = _engine(fake, isolation="shared", scrub="request")
    stream = engine.generate(_spec("a"), tenant="acme")
    assert (await stream.__anext__()).text == "hi"
    await stream.aclose()  # the caller went away mid-stream
    fake.release["b"] = asyncio.Event()
    fake.release["b"].set()
    assert await _collect(engine, "b", "globex") == "hi"
    assert [e[0] for e in fake.log] == [
        "generate",
        "abort",
        "reset_prefix_cache",
        "collective_rpc",
        "generate",
    ]


@pytest.mark.usefixtures("fake_vllm")
async def test_a_prefix_cache_that_will_not_reset_refuses_the_other_tenant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vllm_engine, "_RESET_TRIES", 3)
    monkeypatch.setattr(vllm_engine, "_RESET_PAUSE", 0.0)
    fake = FakeAsyncLLM(reset_ok=False)
    engine = _engine(fake, isolation="shared")
    fake.release["a"] = asyncio.Event()
    fake.release["a"].set()
    assert await _collect(engine, "a", "acme") == "hi"
    with pytest.raises(UnavailableError) as err:
        await _collect(engine, "b", "globex")
    assert err.value.reason == "KV_SCRUB_FAILED"
    assert fake.log.count(("reset_prefix_cache",)) == 3
    assert ("collective_rpc", KV_SCRUB_METHOD) not in fake.log and len(fake.log) == 4  # globex never ran


@pytest.mark.usefixtures("fake_vllm")
async def test_a_dedicated_engine_has_no_gate_and_refuses_other_tenants() -> None:
    fake = FakeAsyncLLM()
    engine = _engine(fake)
    assert engine.gate is None
    fake.release["a"] = asyncio.Event()
    fake.release["a"].set()
    assert await _collect(engine, "a", "acme") == "hi"
    assert fake.log == [("generate", "-")]  # no salt, no scrub
    with pytest.raises(Exception, match="another tenant"):
        await _collect(engine, "b", "globex")
