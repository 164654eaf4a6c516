"""What the worker sends back, sealed: one whole response, or a chunk of what the engine made since
the previous one. Shared by the unary calls (worker/server.py) and the channel (worker/channel.py)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence

from airlock.envelope import Sealer
from airlock.types import FINISH_CODES, GenerationSpec
from airlock.v1 import inference_pb2 as pb
from worker.engine import EngineOutput

__all__ = ["fill_chunk", "fill_response", "text_size"]


async def fill_response(
    response: pb.GenerateResponse, spec: GenerationSpec, sealer: Sealer, outputs: AsyncIterable[EngineOutput]
) -> None:
    """Read the engine to its end into `response`: the whole text sealed once, the finish reason
    and usage of its last output."""
    parts: list[str] = []
    response.request_id, response.model = spec.request_id, spec.model
    async for out in outputs:
        parts.append(out.text)
        if out.finish_reason is not None:
            response.finish_reason = FINISH_CODES[out.finish_reason]
            response.usage.prompt_tokens = out.prompt_tokens
            response.usage.completion_tokens = out.completion_tokens
    response.sealed_text.CopyFrom(sealer.seal("".join(parts).encode(), final=True))


def fill_chunk(
    chunk: pb.GenerateChunk, spec: GenerationSpec, sealer: Sealer, batch: Sequence[EngineOutput]
) -> bool:
    """Consecutive engine outputs as one sealed chunk: texts joined, tokens added; only the last
    output of a stream has a finish reason (and with it the usage). Returns whether it was the last."""
    out = batch[-1]
    final = out.finish_reason is not None
    chunk.request_id = spec.request_id
    chunk.tokens = sum(o.tokens for o in batch)
    text = out.text if len(batch) == 1 else "".join(o.text for o in batch)
    chunk.sealed_text.CopyFrom(sealer.seal(text.encode(), final=final))
    if out.finish_reason is not None:
        chunk.finish_reason = FINISH_CODES[out.finish_reason]
        chunk.usage.prompt_tokens = out.prompt_tokens
        chunk.usage.completion_tokens = out.completion_tokens
    return final


def text_size(out: EngineOutput) -> int:
    return len(out.text)
