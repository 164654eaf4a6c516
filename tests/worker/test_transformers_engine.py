"""TransformersEngine on the real bundled model, in process: streaming, stop strings, seeds, abort."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airlock.types import GenerationSpec, Message, Sampling
from worker.engine import EngineOutput
from worker.engines.transformers import TransformersEngine


@pytest.fixture(scope="module")
def engine(bundled_model_dir: Path) -> TransformersEngine:
    return TransformersEngine(bundled_model_dir)


def spec(prompt: str, request_id: str = "r", **sampling: object) -> GenerationSpec:
    sampling.setdefault("max_tokens", 16)
    return GenerationSpec(request_id, "smollm2", (Message("user", prompt),), Sampling(**sampling))  # type: ignore[arg-type]


async def collect(outputs: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [o async for o in outputs]


async def test_streams_tokens_and_reports_totals(engine: TransformersEngine) -> None:
    outs = await collect(engine.generate(spec("What is 2+2?", max_tokens=12, temperature=0.0)))
    final = outs[-1]
    assert final.finish_reason in ("stop", "length")
    assert final.completion_tokens == sum(o.tokens for o in outs) > 0
    assert final.prompt_tokens > 5
    assert "".join(o.text for o in outs).strip()


async def test_max_tokens_gives_length(engine: TransformersEngine) -> None:
    outs = await collect(engine.generate(spec("Tell me a long story.", max_tokens=5, temperature=0.0)))
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 5


async def test_same_seed_same_text(engine: TransformersEngine) -> None:
    runs = [
        "".join(
            o.text for o in await collect(engine.generate(spec("Invent a word.", temperature=1.0, seed=3)))
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


async def test_stop_string_ends_generation_and_is_not_returned(engine: TransformersEngine) -> None:
    free = "".join(
        o.text for o in await collect(engine.generate(spec("Count from 1 to 9.", temperature=0.0)))
    )
    marker = next((ch for ch in "3579" if ch in free), None)
    if marker is None:
        pytest.skip(f"model output had no digit to stop on: {free!r}")
    outs = await collect(engine.generate(spec("Count from 1 to 9.", temperature=0.0, stop=(marker,))))
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "stop"
    assert marker not in text
    assert free.startswith(text)


async def test_abort_stops_promptly(engine: TransformersEngine) -> None:
    outputs = engine.generate(spec("Write a very long essay.", "long", max_tokens=300, temperature=0.8))
    await outputs.__anext__()
    await engine.abort("long")
    rest = await asyncio.wait_for(collect(outputs), timeout=30)
    assert sum(o.tokens for o in rest) < 50
    produced = engine.produced_tokens
    await asyncio.sleep(0.5)
    assert engine.produced_tokens == produced and engine.active == 0


async def test_prompt_longer_than_the_context_is_invalid(bundled_model_dir: Path) -> None:
    from airlock.errors import InvalidRequestError

    engine = TransformersEngine(bundled_model_dir)
    engine.context_length = 64  # as if the model had a 64-token context
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine.generate(spec("word " * 100)))
    assert err.value.reason == "PROMPT_TOO_LONG" and err.value.field == "messages"
    # A prompt that fits gets an answer cut at the context, reported as "length".
    outs = await collect(engine.generate(spec("Say hello.", max_tokens=200, temperature=0.0)))
    prompt = outs[-1].prompt_tokens
    if outs[-1].completion_tokens == 64 - prompt:
        assert outs[-1].finish_reason == "length"
    assert prompt + outs[-1].completion_tokens <= 64
    await engine.close()


async def test_kv_cache_is_zeroed_when_the_request_ends(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    caches: list[object] = []
    new_cache = engine._new_cache

    def recording() -> object:
        caches.append(new_cache())
        return caches[-1]

    monkeypatch.setattr(engine, "_new_cache", recording)
    before = engine.zeroed_kv_bytes
    outs = await collect(engine.generate(spec("Name a colour.", max_tokens=6, temperature=0.0)))
    assert outs[-1].completion_tokens > 0
    (cache,) = caches
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # type: ignore[attr-defined]
    assert tensors and all(isinstance(t, torch.Tensor) and t.numel() > 0 for t in tensors)
    assert all(not t.any() for t in tensors)  # every key and value is zero now
    assert engine.zeroed_kv_bytes - before == sum(t.numel() * t.element_size() for t in tensors)
    # With scrubbing off the cache is left as the model wrote it (so the check above can fail).
    monkeypatch.setattr(engine, "scrub_kv", False)
    await collect(engine.generate(spec("Name a colour.", max_tokens=6, temperature=0.0)))
    assert any(t.any() for layer in caches[1].layers for t in (layer.keys, layer.values))  # type: ignore[attr-defined]


async def test_generates_abort_and_zeroes_the_kv_cache_on_cuda(bundled_model_dir: Path) -> None:
    """The same engine on a GPU: every tensor generate() combines must live on the model's device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the engine on a GPU needs one")
    engine = TransformersEngine(bundled_model_dir, device="cuda")
    try:
        outs = await collect(engine.generate(spec("What is 2+2?", max_tokens=12, temperature=0.0)))
        assert outs[-1].completion_tokens == sum(o.tokens for o in outs) > 0
        assert "".join(o.text for o in outs).strip() and engine.zeroed_kv_bytes > 0
        outputs = engine.generate(spec("Write a very long essay.", "long", max_tokens=300, temperature=0.8))
        await outputs.__anext__()
        await engine.abort("long")
        assert sum(o.tokens for o in await asyncio.wait_for(collect(outputs), timeout=30)) < 50
    finally:
        await engine.close()
