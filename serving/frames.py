"""Frames waiting for a stream's one writer, gathered into batch messages (the worker channel).

grpc.aio allows one write in flight per call (a second concurrent `write` fails), so each end of
the gateway-worker channel has one writer; whatever has something to send adds a frame here, and
the writer takes everything that piled up while its previous message was on its way as one batch.
Frames that keep coming while the writer is busy cost one gRPC write, one read on the other side and
one event-loop turn per batch instead of per frame. A batch is cut at `limit` bytes (callers give
each frame's approximate size), far below the gRPC message limit, whatever piles up; a frame that
could not fit the peer's message limit on its own is never added (each end refuses that request
alone instead: a failed write would end the stream for everyone on it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BATCH_BYTES", "FRAME_OVERHEAD", "Outbox"]

B = TypeVar("B")  # a batch message (GatewayFrames, WorkerFrames)
F = TypeVar("F")  # one of its frames

BATCH_BYTES = 256 << 10
# What a batch adds around one frame, with room to spare: a frame alone in a batch must stay within
# the peer's message limit, or the write fails and with it the stream and every request on it.
FRAME_OVERHEAD = 64


class Outbox(Generic[B, F]):
    """Frames in order, handed out as batches; `new()` makes an empty batch, `add(batch)` appends an
    empty frame to one and returns it (to be filled in at once by the caller of `add`)."""

    def __init__(self, new: Callable[[], B], add: Callable[[B], F], *, limit: int = BATCH_BYTES) -> None:
        self._new = new
        self._add = add
        self._limit = limit
        self._full: deque[B] = deque()
        self._batch: B | None = None
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None

    def add(self, size: int) -> F:
        """A new frame at the end; `size` is about how many bytes it will take on the wire."""
        if self._batch is None:
            self._batch, self._bytes = self._new(), 0
        elif self._bytes + size > self._limit:
            self._full.append(self._batch)
            self._batch, self._bytes = self._new(), 0
        self._bytes += size
        self.wake()
        return self._add(self._batch)

    def take(self) -> B | None:
        """The oldest batch, None when there is nothing to send."""
        if self._full:
            return self._full.popleft()
        batch, self._batch = self._batch, None
        return batch

    def __bool__(self) -> bool:
        return self._batch is not None or bool(self._full)

    def wake(self) -> None:
        """End a `wait()` now (also when nothing was added: the writer has something else to do)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Until a frame is added or `wake()` is called; at once when frames are waiting."""
        if self:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
