"""Streams handed on in batches: read ahead, and merge what piled up while the consumer was busy.

Used where a stream of small pieces is passed on over gRPC: the worker (engine outputs to sealed
chunks) and the gateway (the worker's chunks to the caller). The source is read as fast as it
produces, by a task of its own, into a bounded queue; the consumer takes everything that arrived
while it was still sending its previous message, as one batch. A consumer that keeps up gets one
item per batch, so nothing is ever held back; one that falls behind (a slow caller, a busy gateway)
gets several, merged into one message instead of paying a gRPC write, a read on the other side and
an event-loop turn per token (vLLM's output collector merges deltas for a lagging consumer for the
same reason). The queue bounds what is held per stream: when it is full the reader waits, and gRPC's
flow control, or the engine's own queue, holds the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TypeVar

__all__ = ["batches"]

T = TypeVar("T")

_END = object()
_NOTHING = object()


async def batches(
    source: AsyncIterable[T],
    *,
    depth: int = 64,
    max_bytes: int = 16 << 10,
    size: Callable[[T], int] = lambda _item: 0,
) -> AsyncIterator[list[T]]:
    """Yield `source`'s items in order, as lists of at least one: all that arrived since the last
    yield, at most `depth` items and (past the first item) at most `max_bytes` by `size`.

    An error of `source` is raised after every item that came before it was yielded. Leaving the
    iteration early cancels the reader and waits for it to stop, so its owner can close `source`."""
    queue: asyncio.Queue[object] = asyncio.Queue(depth)

    async def read() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except BaseException as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the consumer left: nobody to tell
                raise
            await queue.put(exc)  # the consumer raises it, in its place in the stream
        else:
            await queue.put(_END)

    reader = asyncio.create_task(read())
    held: object = _NOTHING  # an item taken from the queue that didn't fit into the last batch
    try:
        while True:
            item = held if held is not _NOTHING else await queue.get()
            held = _NOTHING
            batch: list[T] = []
            total = 0
            while True:
                if item is _END or isinstance(item, BaseException):
                    if batch:
                        held = item
                        break
                    if item is _END:
                        return
                    raise item  # type: ignore[misc]
                total += size(item)  # type: ignore[arg-type]
                if batch and (total > max_bytes or len(batch) == depth):
                    held = item
                    break
                batch.append(item)  # type: ignore[arg-type]
                if queue.empty():
                    break
                item = queue.get_nowait()
            yield batch
    finally:
        reader.cancel()
        await asyncio.wait([reader])
