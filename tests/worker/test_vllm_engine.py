"""VllmEngine: its settings and tenant cache salts everywhere; the engine itself only with vLLM and a GPU."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from airlock.types import GenerationSpec, Message, Sampling
from worker.engines.vllm import VllmEngine, VllmSettings, cache_salt, maverick_fp8
from worker.isolation.plan import MODELS


def test_cache_salts_are_per_tenant_and_keyed() -> None:
    key, other_key = b"k" * 32, b"x" * 32
    assert cache_salt(key, "acme") == cache_salt(key, "acme")
    assert cache_salt(key, "acme") != cache_salt(key, "globex")
    assert cache_salt(key, "acme") != cache_salt(other_key, "acme")  # nobody without the key can compute it
    assert "acme" not in cache_salt(key, "acme") and len(cache_salt(key, "acme")) == 64


def test_maverick_preset_matches_the_plan_and_vllm_arguments() -> None:
    args = maverick_fp8(Path("/models/maverick-fp8")).engine_args()
    assert args["tensor_parallel_size"] == 8
    assert args["max_model_len"] == MODELS["llama4-maverick-fp8"].context == 430_000
    assert "quantization" not in args  # the FP8 checkpoint brings its own quantization config
    assert maverick_fp8(Path("/m"), checkpoint_is_fp8=False).engine_args()["quantization"] == "fp8"
    assert args["gpu_memory_utilization"] == 0.90  # the plan's 10% margin
    assert args["enable_log_requests"] is False  # request logs would carry prompts


def _gpu_or_skip() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: VllmEngine runs on GPU domains only")


def _spec(text: str, max_tokens: int = 16, request_id: str = "r1") -> GenerationSpec:
    return GenerationSpec(request_id, "m", (Message("user", text),), Sampling(max_tokens, temperature=0.0))


NO_VLLM = "vLLM is not installed (the `gpu` extra); VllmEngine needs it"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=NO_VLLM)
async def test_streams_aborts_and_salts_shared_requests(bundled_model_dir: Path) -> None:
    _gpu_or_skip()
    settings = VllmSettings(bundled_model_dir, max_model_len=2048, gpu_memory_utilization=0.3,
                            isolation="shared")  # fmt: skip
    engine = VllmEngine(settings, tenant="acme", salt_key=b"s" * 32)
    try:
        outs = [o async for o in engine.generate(_spec("Say hello."), tenant="acme")]
        assert outs[-1].finish_reason in ("stop", "length") and outs[-1].completion_tokens > 0
        assert (
            engine.prompt_for(_spec("x"), "acme")["cache_salt"]
            != engine.prompt_for(_spec("x"), "globex")["cache_salt"]
        )
        stream = engine.generate(_spec("Count to one hundred.", max_tokens=512, request_id="long"))
        await stream.__anext__()
        await stream.aclose()  # leaving early aborts the request in vLLM
        await asyncio.sleep(0.5)
        assert engine.active == 0
    finally:
        await engine.close()
