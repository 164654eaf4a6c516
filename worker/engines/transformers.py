"""TransformersEngine: the default engine, a Hugging Face causal LM on the CPU (or one GPU).

Generation runs in a dedicated thread so the event loop keeps serving; tokens cross back through
`call_soon_threadsafe`. One generation runs at a time (batch 1, as the hardware this serves on
the CPU does best); a stopping criterion checked after every token makes abort prompt.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from airlock.errors import InvalidRequestError
from airlock.types import GenerationSpec, Sampling
from worker.engine import EngineOutput
from worker.engines.chat_prompt import ChatPrompter

__all__ = ["TransformersEngine"]

_END = object()


@dataclass(frozen=True)
class _Piece:
    text: str
    tokens: int


class TransformersEngine:
    kind = "transformers"

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int = 0,
        device: str = "cpu",
        scrub_kv: bool = True,
        allow_special_tokens: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        # Callers' text never spells the template's control tokens, unless the model opts out.
        self.prompter = ChatPrompter(self.tokenizer, allow_special_tokens=allow_special_tokens)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        self.model.to(device).eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.produced_tokens = 0
        self.active = 0
        # Zero each request's KV cache when it ends (the worker's "request" scrub mode).
        self.scrub_kv = scrub_kv
        self.zeroed_kv_bytes = 0
        self._slot = asyncio.Semaphore(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._stops: dict[str, threading.Event] = {}

    async def generate(self, spec: GenerationSpec, *, tenant: str = "") -> AsyncIterator[EngineOutput]:
        loop = asyncio.get_running_loop()
        # Templating and tokenizing a long prompt takes a while: keep it off the event loop.
        inputs = _batch(await asyncio.to_thread(self.prompter.ids, spec.messages))
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens >= self.context_length:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens; this model's context is {self.context_length}",
                reason="PROMPT_TOO_LONG",
                field="messages",
            )
        # Like max_tokens, the context bounds the answer; reaching either ends it with "length".
        sampling = replace(
            spec.sampling, max_tokens=min(spec.sampling.max_tokens, self.context_length - prompt_tokens)
        )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        streamer = _Streamer(
            self.tokenizer,
            emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
            stop_strings=spec.sampling.stop,
            stop_event=stop,
            on_tokens=self._count,
        )
        async with self._slot:
            self._stops[spec.request_id] = stop
            self.active += 1
            future = loop.run_in_executor(self._executor, self._run, inputs, sampling, streamer, stop)
            try:
                while (item := await queue.get()) is not _END:
                    yield EngineOutput(text=item.text, tokens=item.tokens)
                await future  # re-raises a failure in the generation thread
                completion = len(streamer.token_ids)
                finish = "length" if not streamer.hit_stop and completion >= sampling.max_tokens else "stop"
                yield EngineOutput(
                    text="",
                    tokens=0,
                    finish_reason=finish,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion,
                )
            finally:
                stop.set()
                self._stops.pop(spec.request_id, None)
                # Hold the slot until the thread really stopped computing for this request.
                try:
                    await asyncio.wait([future])
                finally:
                    self.active -= 1

    def _count(self, n: int) -> None:
        self.produced_tokens += n

    def _run(self, inputs: Any, sampling: Sampling, streamer: _Streamer, stop: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Abort(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                # On the ids' device: generate combines it with its own flags there (cuda:0 on a GPU).
                return torch.full(
                    (input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device
                )

        try:
            if stop.is_set():
                return
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            kwargs: dict[str, Any] = {
                "max_new_tokens": sampling.max_tokens,
                "streamer": streamer,
                "stopping_criteria": StoppingCriteriaList([_Abort()]),
                "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            }
            if sampling.temperature > 0:
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            cache = self._new_cache()
            with torch.inference_mode():  # the cache's tensors are inference tensors: zero them here
                try:
                    kwargs[_cache_kwarg()] = cache
                    self.model.generate(**inputs.to(self.device), **kwargs)
                finally:
                    if self.scrub_kv:
                        self.zeroed_kv_bytes += _zero_cache(cache)
        finally:
            streamer.end()

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    async def abort(self, request_id: str) -> None:
        stop = self._stops.get(request_id)
        if stop is not None:
            stop.set()

    async def close(self) -> None:
        for stop in self._stops.values():
            stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _batch(ids: list[int]) -> Any:
    """One prompt as the batch `generate` takes (tensors, with its attention mask)."""
    from transformers import BatchEncoding

    return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type="pt")


@functools.cache
def _cache_kwarg() -> str:
    """Newer transformers 5.x call generate's cache `cache` and warn on `past_key_values`."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _zero_cache(cache: Any) -> int:
    """Zero the keys and values a request left in its cache; returns the bytes zeroed.

    DynamicCache grows by concatenation, so earlier, shorter copies went back to the allocator
    unzeroed: this clears the final (complete) tensors; the domain scrub covers the rest.
    """
    import torch

    zeroed = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                tensor.zero_()
                zeroed += tensor.numel() * tensor.element_size()
    return zeroed


class _Streamer:
    """Receives token ids from `generate` (in its thread) and emits decoded text pieces.

    Text is decoded from all ids so far, so multi-byte characters split across tokens come out
    whole; with stop strings, the last few characters are held back until they can't start one.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        emit: Callable[[Any], Any],
        stop_strings: tuple[str, ...],
        stop_event: threading.Event,
        on_tokens: Callable[[int], None],
    ) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._stop_strings = stop_strings
        self._holdback = max((len(s) for s in stop_strings), default=1) - 1
        self._stop_event = stop_event
        self._on_tokens = on_tokens
        self._prompt_seen = False
        self._sent = 0
        self._pending = 0
        self.token_ids: list[int] = []
        self.hit_stop = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        if self.hit_stop:
            return
        ids = value.reshape(-1).tolist()
        self.token_ids.extend(ids)
        self._pending += len(ids)
        self._on_tokens(len(ids))
        text = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        for s in self._stop_strings:
            at = text.find(s, max(0, self._sent - len(s)))
            if at != -1:
                self.hit_stop = True
                self._stop_event.set()
                self._flush(text[:at], final=True)
                return
        self._flush(text[: len(text) - self._holdback] if self._stop_strings else text)

    def end(self) -> None:
        if not self.hit_stop:
            self._flush(self._tokenizer.decode(self.token_ids, skip_special_tokens=True), final=True)
        self._emit(_END)

    def _flush(self, text: str, *, final: bool = False) -> None:
        piece = text[self._sent :]
        if piece or (final and self._pending):
            self._emit(_Piece(piece, self._pending))
            self._sent += len(piece)
            self._pending = 0
