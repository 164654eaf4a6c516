"""EchoEngine: a deterministic engine for tests and benchmarks only, never for real traffic.

It answers with the words of the last user message, one token per word, at a configurable rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from airlock.types import GenerationSpec
from worker.engine import EngineOutput

__all__ = ["EchoEngine"]


class EchoEngine:
    kind = "echo"

    def __init__(self, tokens_per_second: float = 0.0) -> None:
        self.tokens_per_second = tokens_per_second
        self.produced_tokens = 0
        self.active = 0
        self._running: set[str] = set()
        self._aborted: set[str] = set()

    async def generate(self, spec: GenerationSpec, *, tenant: str = "") -> AsyncIterator[EngineOutput]:
        users = [m for m in spec.messages if m.role == "user"] or list(spec.messages)
        words = users[-1].content.split()
        prompt_tokens = sum(len(m.content.split()) for m in spec.messages)
        limit = spec.sampling.max_tokens
        loop = asyncio.get_running_loop()
        start = loop.time()
        text = ""
        produced = 0
        finish = "length" if len(words) > limit else "stop"
        self.active += 1
        self._running.add(spec.request_id)
        try:
            for i, word in enumerate(words[:limit]):
                if self.tokens_per_second > 0:
                    await asyncio.sleep(max(0.0, start + (i + 1) / self.tokens_per_second - loop.time()))
                if spec.request_id in self._aborted:
                    return
                piece = word if i == 0 else " " + word
                hit = next((s for s in spec.sampling.stop if s in text + piece), None)
                if hit is not None:
                    piece = (text + piece)[: (text + piece).index(hit)][len(text) :]
                produced += 1
                self.produced_tokens += 1
                text += piece
                yield EngineOutput(text=piece, tokens=1)
                if hit is not None:
                    finish = "stop"
                    break
            yield EngineOutput(
                text="",
                tokens=0,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=produced,
            )
        finally:
            self.active -= 1
            self._running.discard(spec.request_id)
            self._aborted.discard(spec.request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._aborted.add(request_id)

    async def close(self) -> None:
        return None
