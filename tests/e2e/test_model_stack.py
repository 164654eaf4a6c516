"""End to end with the real bundled model (SmolLM2-135M-Instruct) behind the gateway."""

from __future__ import annotations

import asyncio
import time

from airlock import Client
from tests.support import LiveStack


async def test_unary_answer_from_the_bundled_model(model_stack: LiveStack) -> None:
    async with model_stack.client("acme") as client:
        answer = await client.generate("What is the capital of France?", max_tokens=24, temperature=0.0)
    assert answer.text.strip()
    assert answer.model == "smollm2"
    assert answer.prompt_tokens > 5 and 0 < answer.completion_tokens <= 24
    assert answer.finish_reason in ("stop", "length")


async def test_streamed_answer_arrives_in_several_chunks(model_stack: LiveStack) -> None:
    async with model_stack.client("globex") as client:
        chunks = [c async for c in client.stream("Name three colours.", max_tokens=32, seed=7)]
    texts = [c.text for c in chunks if c.text]
    assert len(texts) >= 3
    assert "".join(texts).strip()
    final = chunks[-1]
    assert final.finish_reason in ("stop", "length")
    assert final.prompt_tokens > 0 and final.completion_tokens == sum(c.tokens for c in chunks)


async def test_each_tenant_reaches_only_its_own_worker(model_stack: LiveStack) -> None:
    before = {t: (await model_stack.worker_info(t, "smollm2")).requests_started for t in ("acme", "globex")}
    async with model_stack.client("acme") as client:
        await client.generate("Say hi.", max_tokens=4)
    after = {t: await model_stack.worker_info(t, "smollm2") for t in ("acme", "globex")}
    assert after["acme"].requests_started == before["acme"] + 1
    assert after["globex"].requests_started == before["globex"]
    assert (after["acme"].tenant, after["globex"].tenant) == ("acme", "globex")


async def test_cancel_stops_the_model_generating(model_stack: LiveStack) -> None:
    async with model_stack.client("acme") as client:
        stream = client.stream("Write a very long story about a lighthouse.", max_tokens=400, temperature=0.8)
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
    end = time.monotonic() + 10
    while (await model_stack.worker_info("acme", "smollm2")).active and time.monotonic() < end:
        await asyncio.sleep(0.05)
    produced = (await model_stack.worker_info("acme", "smollm2")).produced_tokens
    await asyncio.sleep(1.0)  # ~20 tokens' worth at this model's speed
    info = await model_stack.worker_info("acme", "smollm2")
    assert info.active == 0
    assert info.produced_tokens == produced


def test_sync_client_generate_and_stream(model_stack: LiveStack) -> None:
    with Client(
        model_stack.address, token=model_stack.token("acme"), ca_cert=model_stack.pki.ca_cert
    ) as client:
        answer = client.generate("Reply with one word.", max_tokens=8)
        chunks = list(client.stream("Count to five.", max_tokens=16))
    assert answer.completion_tokens > 0
    assert chunks[-1].finish_reason in ("stop", "length") and "".join(c.text for c in chunks)
