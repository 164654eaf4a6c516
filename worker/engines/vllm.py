"""VllmEngine: the production engine on vLLM's async engine (AsyncLLM), for GPU domains.

vLLM is imported only when an engine is built (the `gpu` extra); nothing here runs without it.
Isolation levels: `dedicated` (default, one tenant per engine and domain) and `shared` (explicit
opt-in, several tenants on one engine): every shared request carries a per-tenant `cache_salt`,
so a prefix-cache hit can never cross tenants (CVE-2025-46570: cache timing told one tenant what
another had sent). vLLM does not zero KV blocks when a request ends; in a dedicated domain the
scrubber overwrites the whole domain after the worker exits (docs/isolation.md). A shared engine
(scrub "request" or "tenant-switch") also lets the previous tenant's requests drain, resets the
prefix cache and zeroes the KV cache tensors before another tenant's request runs
(worker/engines/kv_scrub.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airlock.errors import InvalidRequestError, UnavailableError
from airlock.types import GenerationSpec
from worker.engine import EngineOutput
from worker.engines.chat_prompt import ChatPrompter
from worker.engines.kv_scrub import KV_SCRUB_METHOD, KvScrubExtension, TenantGate

__all__ = ["ISOLATION_LEVELS", "VllmEngine", "VllmSettings", "cache_salt", "maverick_fp8"]

ISOLATION_LEVELS = ("dedicated", "shared")
_RESET_TRIES, _RESET_PAUSE = 50, 0.02  # up to ~1 s for aborted requests' blocks to be freed
# Set before vLLM is imported: no usage report, no hub access (the worker sets them too).
OFFLINE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip


@dataclass(frozen=True)
class VllmSettings:
    model_dir: Path
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's own
    quantization: str | None = None  # None: what the checkpoint's config says
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.90  # the 10% margin `airlock plan` counts
    enable_prefix_caching: bool = True
    isolation: str = "dedicated"
    scrub: str = "request"  # shared engines: "request" and "tenant-switch" zero KV between tenants
    allow_special_tokens: bool = False  # True: callers' text may spell the chat template's control tokens

    @property
    def scrubs_kv(self) -> bool:
        return self.isolation == "shared" and self.scrub != "off"

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's AsyncEngineArgs."""
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "tensor_parallel_size": self.tensor_parallel_size,
            "kv_cache_dtype": self.kv_cache_dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": self.enable_prefix_caching,
            "disable_log_stats": True,
            "enable_log_requests": False,  # request logs would carry prompts
        }
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        if self.quantization is not None:
            args["quantization"] = self.quantization
        if self.scrubs_kv:  # vLLM mixes it into its worker class, for collective_rpc
            args["worker_extension_cls"] = f"{KvScrubExtension.__module__}.{KvScrubExtension.__qualname__}"
        return args


def maverick_fp8(model_dir: Path, *, checkpoint_is_fp8: bool = True) -> VllmSettings:
    """Llama 4 Maverick on an 8-GPU domain at FP8 (`airlock plan --model llama4-maverick-fp8`).

    Meta's FP8 checkpoint carries its own quantization config (passing `quantization` as well makes
    vLLM refuse the mismatch); a BF16 checkpoint is quantized to FP8 online. 430K tokens is the
    context vLLM documents for Maverick on 8xH100.
    """
    return VllmSettings(
        model_dir,
        tensor_parallel_size=8,
        max_model_len=430_000,
        quantization=None if checkpoint_is_fp8 else "fp8",
    )


def cache_salt(key: bytes, tenant: str) -> str:
    """A tenant's prefix-cache salt: keyed, so it reveals nothing and nobody else can compute it."""
    return hmac.new(key, b"airlock-cache-salt\0" + tenant.encode(), hashlib.sha256).hexdigest()


class VllmEngine:
    kind = "vllm"

    def __init__(
        self,
        settings: VllmSettings,
        *,
        tenant: str,
        salt_key: bytes | None = None,
        engine: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """`engine` and `tokenizer` stand in for vLLM's AsyncLLM and the model's tokenizer in tests
        of the code around them; production builds both from `settings`."""
        if settings.isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION_LEVELS)}")
        self.settings = settings
        self.tenant = tenant
        # A fresh key per engine: salts only need to differ between tenants of this engine.
        self._salt_key = salt_key or secrets.token_bytes(32)
        if engine is None:
            os.environ.update(OFFLINE_ENV)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(settings.model_dir, local_files_only=True)
        # vLLM gets token ids, built here: callers' text never spells a control token (chat_prompt.py).
        # Before the engine: a tokenizer that can't keep them out stops the worker before it takes the GPUs.
        self.prompter = ChatPrompter(tokenizer, allow_special_tokens=settings.allow_special_tokens)
        if engine is None:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**settings.engine_args()))
        self.tokenizer = tokenizer
        self._engine = engine
        self.produced_tokens = 0
        self.active = 0
        self.zeroed_kv_bytes = 0
        self._ids: dict[str, set[str]] = {}  # the caller's request id -> vLLM's ids
        self.gate = TenantGate(self._scrub_caches) if settings.scrubs_kv else None

    async def _scrub_caches(self) -> None:
        """Between tenants, with no request in flight: forget every cached prefix, then zero the KV
        cache tensors on every worker. Anything short of both fails the switch (UNAVAILABLE)."""
        # An aborted request's blocks are freed by the engine core a moment later: retry briefly.
        for _ in range(_RESET_TRIES):
            if await self._engine.reset_prefix_cache():
                break
            await asyncio.sleep(_RESET_PAUSE)
        else:
            raise UnavailableError("the engine's prefix cache could not be reset; retry",
                                   reason="KV_SCRUB_FAILED")  # fmt: skip
        try:
            zeroed = await self._engine.collective_rpc(KV_SCRUB_METHOD)
        except Exception:
            raise UnavailableError("the engine's KV cache could not be zeroed; retry",
                                   reason="KV_SCRUB_FAILED") from None  # fmt: skip
        self.zeroed_kv_bytes += sum(int(z) for z in zeroed)

    def prompt_for(self, spec: GenerationSpec, tenant: str) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": self.prompter.ids(spec.messages)}
        if self.settings.isolation == "shared":
            prompt["cache_salt"] = cache_salt(self._salt_key, tenant)
        return prompt

    async def generate(self, spec: GenerationSpec, *, tenant: str = "") -> AsyncIterator[EngineOutput]:
        tenant = tenant or self.tenant
        if self.settings.isolation == "dedicated" and tenant != self.tenant:
            raise InvalidRequestError("this engine serves another tenant", reason="WRONG_TENANT")
        prompt = await asyncio.to_thread(self.prompt_for, spec, tenant)
        params = self._params(spec)
        gate: contextlib.AbstractAsyncContextManager[None] = (
            self.gate.enter(tenant) if self.gate is not None else contextlib.nullcontext()
        )
        # The request's own abort runs inside the gate: its blocks are free before a switch.
        async with gate, contextlib.aclosing(self._run(spec, prompt, params)) as outputs:
            async for out in outputs:
                yield out

    @staticmethod
    def _params(spec: GenerationSpec) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = spec.sampling
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p if s.temperature > 0 else 1.0,
            seed=s.seed,
            stop=list(s.stop),
            output_kind=RequestOutputKind.DELTA,  # only the new tokens in each output
        )

    async def _run(
        self, spec: GenerationSpec, prompt: dict[str, Any], params: Any
    ) -> AsyncGenerator[EngineOutput, None]:
        # The caller's id is not unique across tenants of a shared engine: vLLM gets its own.
        internal = uuid.uuid4().hex
        self._ids.setdefault(spec.request_id, set()).add(internal)
        self.active += 1
        completion = 0
        finished = False
        try:
            async for out in self._engine.generate(prompt, params, internal):
                piece = out.outputs[0]
                tokens = len(piece.token_ids)
                completion += tokens
                self.produced_tokens += tokens
                if piece.text or tokens:
                    yield EngineOutput(text=piece.text, tokens=tokens)
                if out.finished:
                    finished = True
                    if piece.finish_reason in ("stop", "length"):
                        yield EngineOutput(
                            text="",
                            tokens=0,
                            finish_reason=piece.finish_reason,
                            prompt_tokens=len(prompt["prompt_token_ids"]),
                            completion_tokens=completion,
                        )
        finally:
            self.active -= 1
            self._ids[spec.request_id].discard(internal)
            if not self._ids[spec.request_id]:
                del self._ids[spec.request_id]
            if not finished:  # cancelled or left early: free its KV blocks now
                await self._engine.abort(internal)

    async def abort(self, request_id: str) -> None:
        internal = list(self._ids.get(request_id, ()))
        if internal:
            await self._engine.abort(internal)

    async def close(self) -> None:
        self._engine.shutdown()
