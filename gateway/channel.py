"""The gateway's end of the multiplexed worker channel: many requests on a few long-lived streams.

A gRPC call per request costs both processes more CPU than the request's own work (measured: a
unary call ~335 µs of client+server CPU on loopback, the same request as frames on long-lived
streams ~140 µs), so the gateway keeps `STREAMS` `Worker/Channel` streams open to each worker and
sends every generation as frames on one of them (protos/airlock/v1/worker.proto; the worker's end
is worker/channel.py). Each request has its own id on the stream, its deadline and cancellation in
the frames, and its own flow control: this end always reads the stream and holds up to `CREDIT`
bytes of chunks per request for its caller (and the one chunk that overdrew it), granting more as
the caller takes them, so a slow reader holds up only its own request (the worker merges and then
stops reading that engine meanwhile). A stream of a decoder's pace never needs a credit frame.

Failures read like a unary call's: a request ends with the `grpc.aio.AioRpcError` the worker's
status (or the broken stream: UNAVAILABLE) makes, so the pipeline's retry and error mapping are the
same for both. A stream that breaks fails only the requests on it; it is opened again on the next
request, or by `keep_open` (with backoff), which also says whether the worker can be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

import grpc
from google.rpc import status_pb2

from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from serving.frames import BATCH_BYTES, FRAME_OVERHEAD, Outbox

__all__ = ["CREDIT", "STREAMS", "TOKEN_CHANNEL_OPTIONS", "TOKEN_WINDOW", "Exchange", "WorkerChannel"]

_log = logging.getLogger("airlock.channel")

STREAMS = 2  # long-lived Channel streams per worker; requests take them in turn
CREDIT = 64 << 10  # chunk bytes a worker may send for one stream request before its caller takes them
MERGE_BYTES = 16 << 10  # chunks handed to a caller at once: what arrived, up to this much past the first
TOKEN_WINDOW = 512  # bytes: a token stream's receive window (gRPC's lookahead), about one message of tokens
# gRPC arguments of a `tokens` channel: each stream's window is TOKEN_WINDOW, not grown by BDP probing
# (which opens it to megabytes on loopback). A message larger than the window waits one round trip for
# the rest of its room; the tokens made meanwhile go in the next message.
TOKEN_CHANNEL_OPTIONS = (("grpc.http2.lookahead_bytes", TOKEN_WINDOW), ("grpc.http2.bdp_probe", 0))
CONNECT_SECONDS = 10.0  # for a stream to open (the worker's first message)
_RETRY = (0.1, 1.0)  # seconds: first and longest pause before keep_open tries a lost worker again
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _size(chunk: pb.GenerateChunk) -> int:
    """What a chunk costs of its request's credit (worker/channel.py counts the same)."""
    return len(chunk.sealed_text.ciphertext) + len(chunk.text)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _failure(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    """A worker's error frame as the error a unary call would have raised (with the same details)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, status.message)


class Exchange:
    """One request on a channel: its answer, or its chunks as they come; `close()` when done with it
    (a request not answered yet is cancelled: the worker aborts its engine)."""

    __slots__ = ("_chunks", "_error", "_held", "_response", "_stream", "_taken", "_timer", "_waiter", "ended",
                 "id")  # fmt: skip

    def __init__(self, stream: _Stream, id_: int, deadline: float | None) -> None:
        self._stream = stream
        self.id = id_
        self._chunks: deque[pb.GenerateChunk] = deque()
        self._response: pb.GenerateResponse | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._held = 0  # chunk bytes that arrived and were not granted back yet
        self._taken = 0  # chunk bytes the caller took since the last credit frame
        self.ended = False  # its last frame arrived, it failed, or it was closed
        self._timer = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._expire)

    @property
    def buffered(self) -> int:
        """Bytes of chunks that arrived and wait for the caller (at most CREDIT and one chunk)."""
        return sum(_size(c) for c in self._chunks)

    async def response(self) -> pb.GenerateResponse:
        """The whole answer of a unary request."""
        while not self.ended:
            await self._wait()
        if self._error is not None:
            raise self._error
        if self._response is None:
            raise _error(grpc.StatusCode.INTERNAL, "the worker answered a unary request with chunks")
        return self._response

    async def chunks(self, max_bytes: int = MERGE_BYTES) -> list[pb.GenerateChunk]:
        """The stream's chunks that arrived since the last call (at least one; past the first at
        most `max_bytes` of sealed text); [] after the last one. Raises the request's error after
        every chunk that came before it."""
        while not self._chunks:
            if self.ended:
                if self._error is not None:
                    raise self._error
                return []
            await self._wait()
        chunks = self._chunks
        batch = [chunks.popleft()]
        total = _size(batch[0])
        while chunks and total + _size(chunks[0]) <= max_bytes:
            total += _size(chunks[0])
            batch.append(chunks.popleft())
        if not self.ended:
            self._taken += total
            if self._taken >= CREDIT // 2:  # half the window back at once: one frame per many chunks
                self._stream.credit(self.id, self._taken)
                self._held -= self._taken
                self._taken = 0
        return batch

    def close(self) -> None:
        if not self.ended:
            self._end()
            self._stream.cancel(self.id)

    def deliver(self, frame: worker_pb2.WorkerFrame) -> None:
        """A frame of the worker's for this request (the stream's reader)."""
        if self.ended:
            return
        kind = frame.WhichOneof("kind")
        if kind == "chunk":
            chunk = frame.chunk
            if self._held >= CREDIT:  # it had no credit left: not a worker of ours
                self.fail(_error(grpc.StatusCode.INTERNAL, "the worker sent past its credit"))
                self._stream.cancel(self.id)
                return
            self._held += _size(chunk)
            self._chunks.append(chunk)
            if chunk.finish_reason:  # a stream's last chunk
                self._end()
        elif kind == "response":
            self._response = frame.response
            self._end()
        elif kind == "error":
            self._error = _failure(frame.error)
            self._end()
        else:
            return
        self._wake()

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        if not self.ended:
            self._error = error
            self._end()
            self._wake()

    def _expire(self) -> None:
        """The caller's deadline passed: stop the worker and say so (the worker enforces it too)."""
        if not self.ended:
            self._stream.cancel(self.id)
            self.fail(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _end(self) -> None:
        self.ended = True
        self._stream.forget(self.id)
        if self._timer is not None:
            self._timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class _Stream:
    """One open Channel call: a reader that hands each frame to its request, a writer that sends what
    piled up as one message. When either fails, every request on it fails UNAVAILABLE."""

    def __init__(self, call: grpc.aio.StreamStreamCall, lost: Callable[[_Stream], None], limit: int) -> None:
        self._call = call
        self._lost = lost
        self._exchanges: dict[int, Exchange] = {}
        self._ids = itertools.count(1)
        self._out: Outbox[worker_pb2.GatewayFrames, worker_pb2.GatewayFrame] = Outbox(
            worker_pb2.GatewayFrames, _new_frame, limit=min(BATCH_BYTES, limit)
        )
        self.open = True
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]

    def exchange(
        self, work: worker_pb2.WorkerRequest, size: int, stream: bool, deadline: float | None
    ) -> Exchange:
        id_ = next(self._ids)
        exchange = Exchange(self, id_, deadline)
        self._exchanges[id_] = exchange
        frame = self._out.add(size)
        frame.id = id_
        frame.open.request.CopyFrom(work)
        if stream:
            frame.open.stream = True
            frame.open.credit = CREDIT
        if deadline is not None:
            frame.open.timeout.FromNanoseconds(max(0, int((deadline - time.monotonic()) * 1e9)))
        return exchange

    def cancel(self, id_: int) -> None:
        self._exchanges.pop(id_, None)
        if self.open:
            frame = self._out.add(8)
            frame.id = id_
            frame.cancel.SetInParent()

    def credit(self, id_: int, size: int) -> None:
        if self.open:
            frame = self._out.add(8)
            frame.id = id_
            frame.credit.bytes = size

    def forget(self, id_: int) -> None:
        self._exchanges.pop(id_, None)

    @property
    def busy(self) -> int:
        return len(self._exchanges)

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                exchanges = self._exchanges
                for frame in message.frames:
                    exchange = exchanges.get(frame.id)
                    if exchange is not None:  # else: cancelled meanwhile
                        exchange.deliver(frame)
        except grpc.aio.AioRpcError as exc:
            _log.debug("worker channel ended: %s", exc.code().name)
        except Exception as exc:
            _log.error("worker channel failed", exc_info=exc)
        finally:
            self.close()  # also when the call was cancelled under the read

    async def _write(self) -> None:
        out = self._out
        try:
            while True:
                await out.wait()
                batch = out.take()
                if batch is not None:
                    await self._call.write(batch)
        except Exception as exc:  # the call ended under the write: the reader has, or will have, its status
            _log.debug("worker channel write failed: %s", type(exc).__name__)
        finally:
            self.close()

    def close(self) -> None:
        """End the stream: its requests fail UNAVAILABLE (nothing more will come for them)."""
        if not self.open:
            return
        self.open = False
        self._call.cancel()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        lost = _error(grpc.StatusCode.UNAVAILABLE, "the worker channel was lost")
        exchanges, self._exchanges = self._exchanges, {}
        for exchange in exchanges.values():
            exchange.fail(lost)
        self._lost(self)


class WorkerChannel:
    """Everything the gateway says to one worker: its unary RPCs (`stub`: evidence, key release, info)
    and the generations, on `STREAMS` long-lived Channel streams (`open`). With `tokens`, streamed
    generations take `STREAMS` streams of their own on that channel (closed with this one): a
    channel whose flow-control window holds about one message (`TOKEN_WINDOW`) lets a worker have
    one message of tokens on its way at a time, so what its engine makes while the gateway is busy
    goes as one message instead of a message each (what made one fast stream cost 0.5 of direct),
    while whole answers keep a window that never makes them wait."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        where: Mapping[str, str] | None = None,
        *,
        tokens: grpc.aio.Channel | None = None,
        streams: int = STREAMS,
        max_message_bytes: int = 4 << 20,
    ) -> None:
        self.stub = worker_pb2_grpc.WorkerStub(channel)
        self._tokens = tokens
        self._where = dict(where or {})
        self._max_frame = max_message_bytes - FRAME_OVERHEAD  # the worker's limit is the gateway's
        stubs = [self.stub] * streams
        if tokens is not None:
            stubs += [worker_pb2_grpc.WorkerStub(tokens)] * streams
        self._stubs = stubs
        self._streams: list[_Stream | None] = [None] * len(stubs)
        self._dialing: list[asyncio.Task[_Stream] | None] = [None] * len(stubs)
        # The streams each kind of request takes (by index), and where it takes up next.
        self._lanes = {False: range(streams), True: range(len(stubs) - streams, len(stubs))}
        self._turns = {False: 0, True: 0}
        self._lost_one: asyncio.Event | None = None
        self._closed = False

    @property
    def is_open(self) -> bool:
        """Whether a stream to the worker is open now (requests can be sent at once)."""
        return any(s is not None and s.open for s in self._streams)

    async def open(self, work: worker_pb2.WorkerRequest, *, stream: bool, deadline: float | None) -> Exchange:
        """Send `work` on one of the streams (opening one first when none is), with the caller's
        deadline (monotonic; None: none). A stream fails with UNAVAILABLE when the worker can't be
        reached, DEADLINE_EXCEEDED when the deadline passes first; a request too large for the
        worker's message limit is refused alone (RESOURCE_EXHAUSTED, as gRPC would refuse a call)."""
        if deadline is not None and deadline <= time.monotonic():
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        size = work.ByteSize() + 32  # the frame: ids, flags, credit, timeout
        if size > self._max_frame:
            raise _error(grpc.StatusCode.RESOURCE_EXHAUSTED, "the request is larger than the worker's limit")
        lane = self._lanes[stream]
        for _ in lane:
            i = lane[self._turns[stream] % len(lane)]
            self._turns[stream] += 1
            s = self._streams[i]
            if s is not None and s.open:
                return s.exchange(work, size, stream, deadline)
            if self._dialing[i] is None and any(self._streams):
                self._dial_soon(i)  # a lost or unopened one: opened meanwhile, for the next requests
        s = await self._connect(lane[self._turns[stream] % len(lane)], deadline)
        return s.exchange(work, size, stream, deadline)

    async def keep_open(self, stop: asyncio.Event, changed: Callable[[], Awaitable[None]]) -> None:
        """Keep every stream open until `stop` (opening a lost one again, with backoff), and await
        `changed()` whenever `is_open` flips. Survives anything; it never closes a stream (in-flight
        requests go on after `stop`, until `close`)."""
        lost = self._lost_one = asyncio.Event()
        pause, failing, was = _RETRY[0], "", self.is_open
        while not stop.is_set():
            lost.clear()
            try:
                for i, s in enumerate(self._streams):
                    if s is None or not s.open:
                        await self._connect(i, None)
                pause, failing = _RETRY[0], ""
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "TIMEOUT"
                _log.debug("worker channel not open: %s", code, extra=self._where)
            except Exception as exc:
                failing = _logged("worker channel not open; trying again", exc, failing, self._where)
            if self.is_open != was:
                was = self.is_open
                _log.info("worker channel %s", "open" if was else "closed", extra=self._where)
                try:
                    await changed()
                except Exception as exc:
                    failing = _logged("worker readiness not published", exc, failing, self._where)
            if all(s is not None and s.open for s in self._streams):
                pause = _RETRY[0]
                await _first(stop.wait(), lost.wait())
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                pause = min(pause * 2, _RETRY[1])

    async def drain(self, seconds: float) -> None:
        """Wait until no request is in flight on any stream, at most `seconds`."""
        end = time.monotonic() + seconds
        while any(s is not None and s.busy for s in self._streams) and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._closed = True
        for task in self._dialing:
            if task is not None:
                task.cancel()
        for s in self._streams:
            if s is not None:
                s.close()
        if self._tokens is not None:
            await self._tokens.close(grace=1)

    def _dial_soon(self, i: int) -> asyncio.Task[_Stream]:
        task = self._dialing[i]
        if task is None:
            task = self._dialing[i] = asyncio.create_task(self._dial(i))
            task.add_done_callback(lambda _t: self._dialed(i))
        return task

    async def _connect(self, i: int, deadline: float | None) -> _Stream:
        """Stream `i`, opened now (one attempt, shared by everyone who waits for it)."""
        task = self._dial_soon(i)
        seconds = None if deadline is None else deadline - time.monotonic()
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(task)
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None

    def _dialed(self, i: int) -> None:
        task = self._dialing[i]
        self._dialing[i] = None
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: each waiter has it already

    async def _dial(self, i: int) -> _Stream:
        if self._closed:
            raise _error(grpc.StatusCode.UNAVAILABLE, "the worker channel is closed")
        call = self._stubs[i].Channel()
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                hello = await call.read()
            if hello is grpc.aio.EOF:
                raise _error(grpc.StatusCode.UNAVAILABLE, "the worker ended the channel")
        except TimeoutError:
            call.cancel()
            raise _error(grpc.StatusCode.UNAVAILABLE, "the worker channel did not open in time") from None
        except BaseException:
            call.cancel()
            raise
        s = self._streams[i] = _Stream(call, self._on_lost, self._max_frame)
        return s

    def _on_lost(self, stream: _Stream) -> None:
        for i, s in enumerate(self._streams):
            if s is stream:
                self._streams[i] = None
        if self._lost_one is not None:
            self._lost_one.set()


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _logged(message: str, exc: Exception, failing: str, where: Mapping[str, str]) -> str:
    """Log a failure unless it is the one logged last; returns it, to compare the next with."""
    what = f"{type(exc).__name__}: {exc}"
    if what != failing:
        _log.error(message, exc_info=exc, extra=dict(where))
    return what


def _new_frame(batch: worker_pb2.GatewayFrames) -> worker_pb2.GatewayFrame:
    frame: worker_pb2.GatewayFrame = batch.frames.add()
    return frame
