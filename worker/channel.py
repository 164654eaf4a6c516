"""The worker's end of the multiplexed channel (`Worker/Channel`): many requests on one stream.

The gateway keeps a few long-lived streams open to each worker and sends every request as frames
(protos/airlock/v1/worker.proto): open, cancel, credit. Each open frame becomes a task that is
checked and served exactly as a unary call is (WorkerService.admit: the tenant, the sealed prompt;
the engine; the sealed answer), with its own request id in its log lines and the caller's deadline
enforced here. The answers of all requests go back through the stream's one writer, which takes
everything that piled up while its previous message was on its way as one (serving/frames.py).

Flow control, per stream request: the gateway grants credit in chunk bytes. While a request has
credit, the writer sends what its engine made since the last chunk as one chunk, sealed once (the
last one may overdraw the credit); while it has none,
what the engine makes waits here, merged into the next chunk, up to a bound, and then the request's
task stops reading the engine (the engine's own back-pressure). A slow reader costs its own request
that much memory and nothing else: no other request on the stream waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from airlock.envelope import Sealer
from airlock.errors import (
    AirlockError,
    DeadlineExceededError,
    InvalidRequestError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.rpcstatus import status_of
from airlock.types import GenerationSpec, check_request_id, new_request_id
from airlock.v1 import worker_pb2
from serving.frames import BATCH_BYTES, FRAME_OVERHEAD, Outbox
from serving.logs import bind_request_id
from serving.rpc import logged_error
from worker.answers import fill_chunk, fill_response
from worker.engine import EngineOutput

if TYPE_CHECKING:
    from worker.server import WorkerService

__all__ = ["MERGE_BYTES", "MERGE_DEPTH", "ChannelSession"]

MERGE_DEPTH = 64  # engine outputs a request without credit holds before its engine is no longer read
MERGE_BYTES = 16 << 10  # ... or this much text; also the most one chunk carries past its first output
MAX_CREDIT = 16 << 20  # bytes: what a request may have on its way is bounded whatever is granted
_FRAME_BYTES = 96  # about what a chunk frame adds to its text (ids, counts, the sealed envelope's header)


class _Request:
    """One request on the channel, from its open frame until its last frame is in the outbox."""

    __slots__ = ("credit", "done", "final", "id", "outputs", "sealer", "spec", "stream", "task", "text_bytes",
                 "waiter")  # fmt: skip

    def __init__(self, id_: int, stream: bool, credit: int) -> None:
        self.id = id_
        self.stream = stream
        self.credit = min(credit, MAX_CREDIT)
        self.outputs: list[EngineOutput] = []  # made by the engine, not yet sent
        self.text_bytes = 0
        self.final = False  # the engine's last output is among `outputs`
        self.done = False  # its last frame is in the outbox (or it was cancelled)
        self.waiter: asyncio.Future[None] | None = None  # its task, waiting for room or for the end
        self.spec: GenerationSpec | None = None  # set once admitted, before any output
        self.sealer: Sealer | None = None
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class ChannelSession:
    """One `Channel` call: reads the gateway's frames, runs one task per request, writes the answers."""

    def __init__(
        self,
        service: WorkerService,
        frames: AsyncIterator[worker_pb2.GatewayFrames],
        *,
        draining: bool = False,
    ) -> None:
        self._service = service
        self._frames = frames
        self._requests: dict[int, _Request] = {}
        self._ready: dict[int, _Request] = {}  # requests with output and credit, in the order they got ready
        self._max_frame = service.max_message_bytes - FRAME_OVERHEAD
        self._out: Outbox[worker_pb2.WorkerFrames, worker_pb2.WorkerFrame] = Outbox(
            worker_pb2.WorkerFrames, _new_frame, limit=min(BATCH_BYTES, self._max_frame)
        )
        self._draining = draining
        self._eof = False  # the gateway will send no more frames
        self._failed: BaseException | None = None  # reading the gateway's frames failed

    def drain(self) -> None:
        """Refuse new requests; end the stream once the ones in flight are answered."""
        self._draining = True
        self._out.wake()

    async def run(self) -> AsyncIterator[worker_pb2.WorkerFrames]:
        """The worker's messages: first an empty one (the channel is open), then batches of frames,
        until the gateway stops sending (or the worker drains) and every request is answered."""
        reader = asyncio.create_task(self._read())
        try:
            yield worker_pb2.WorkerFrames()
            while True:
                self._collect()
                batch = self._out.take()
                if batch is not None:
                    yield batch
                    continue
                if self._failed is not None:
                    raise self._failed
                if (self._eof or self._draining) and not self._requests:
                    return
                await self._out.wait()
        finally:
            reader.cancel()
            for request in self._requests.values():
                if request.task is not None:
                    request.task.cancel()  # the stream is gone: abort their engines
            self._requests.clear()

    async def _read(self) -> None:
        try:
            async for message in self._frames:
                for frame in message.frames:
                    kind = frame.WhichOneof("kind")
                    if kind == "credit":
                        self._credit(frame.id, frame.credit.bytes)
                    elif kind == "open":
                        self._open(frame.id, frame.open)
                    elif kind == "cancel":
                        self._cancel(frame.id)
        except Exception as exc:  # the writer raises it (a malformed message aborted the call)
            self._failed = exc
        self._eof = True
        self._out.wake()

    def _open(self, id_: int, frame: worker_pb2.ChannelOpen) -> None:
        if id_ in self._requests:  # the gateway never reuses an id on a stream: not a message of ours
            raise InvalidRequestError("a request id in use on this channel", reason="MALFORMED_REQUEST")
        request = _Request(id_, frame.stream, frame.credit)
        self._requests[id_] = request
        request.task = asyncio.create_task(self._serve(request, frame))

    def _credit(self, id_: int, size: int) -> None:
        request = self._requests.get(id_)
        if request is None:  # answered or cancelled meanwhile
            return
        request.credit = min(request.credit + size, MAX_CREDIT)
        if request.outputs:
            self._ready[id_] = request
            self._out.wake()

    def _cancel(self, id_: int) -> None:
        request = self._requests.pop(id_, None)
        if request is None:
            return
        request.done = True
        self._ready.pop(id_, None)
        if request.task is not None:
            request.task.cancel()  # leaves the engine's iteration: the engine aborts the generation
        self._out.wake()

    async def _serve(self, request: _Request, frame: worker_pb2.ChannelOpen) -> None:
        """Run one request to its last frame; a cancel frame cancels this task."""
        work = frame.request
        request_id = ""
        try:
            request_id = check_request_id(work.request.request_id or new_request_id())
            bind_request_id(request_id)  # this task's log lines, and admit's request id
            if self._draining:
                raise UnavailableError("the worker is shutting down", reason="WORKER_UNAVAILABLE")
            spec, sealer, prompt = self._service.admit(work)
            request.spec, request.sealer = spec, sealer
            timeout = frame.timeout.ToNanoseconds() / 1e9 if frame.HasField("timeout") else None
            async with asyncio.timeout(timeout):
                with self._service.hold(work.tenant, prompt):
                    outputs = self._service.engine.generate(spec, tenant=work.tenant)
                    try:
                        if request.stream:
                            await self._pump(request, outputs)
                        else:
                            frame_out = worker_pb2.WorkerFrame()
                            await fill_response(frame_out.response, spec, sealer, outputs)
                            self._send(request, frame_out, frame_out.response.ByteSize())
                    finally:
                        await outputs.aclose()  # type: ignore[attr-defined]
        except TimeoutError:
            self._fail(request, DeadlineExceededError("deadline exceeded"), request_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(request, logged_error(exc, request_id or new_request_id()), request_id)

    async def _pump(self, request: _Request, outputs: AsyncIterator[EngineOutput]) -> None:
        """Read the engine into the request's outputs for the writer: never more than the bound ahead
        of what was sent; returns once its last chunk is in the outbox."""
        async for out in outputs:
            request.outputs.append(out)
            request.text_bytes += len(out.text)
            if request.credit > 0:
                self._ready[request.id] = request
                self._out.wake()
            if out.finish_reason is not None:  # the engine's last output (its iteration ends after it)
                request.final = True
            while len(request.outputs) >= MERGE_DEPTH or request.text_bytes >= MERGE_BYTES:
                await request.wait()  # no credit, and the bound is reached: stop reading the engine
        if not request.final:
            raise AirlockError("the engine ended a stream without a finish reason", reason="WORKER_FAILED")
        while not request.done:
            await request.wait()  # the writer sends the rest as credit comes (or the deadline passes)

    def _collect(self) -> None:
        """Chunks for every request that has output and credit, each one chunk of all it has (up to
        MERGE_BYTES), sealed once."""
        if not self._ready:
            return
        ready, self._ready = self._ready, {}
        for request in ready.values():
            while request.credit > 0 and request.outputs and not request.done:
                self._chunk(request)

    def _chunk(self, request: _Request) -> None:
        outputs, size = request.outputs, 0
        n = 0
        while n < len(outputs) and (n == 0 or size + len(outputs[n].text) <= MERGE_BYTES):
            size += len(outputs[n].text)
            n += 1
        if size + _FRAME_BYTES > self._max_frame:  # one output bigger than a message may be
            self._fail(request, _too_large(), request.spec.request_id if request.spec else "")
            if request.task is not None:
                request.task.cancel()
            return
        batch = outputs[:n]
        del outputs[:n]
        request.text_bytes -= size
        frame = self._out.add(size + _FRAME_BYTES)
        frame.id = request.id
        final = fill_chunk(frame.chunk, request.spec, request.sealer, batch)  # type: ignore[arg-type]
        chunk = frame.chunk  # what it costs of the credit, counted as the gateway counts it:
        request.credit -= len(chunk.sealed_text.ciphertext) + len(chunk.text)
        if final:
            self._finish(request)
        request.wake()  # room again, or the end

    def _send(self, request: _Request, frame: worker_pb2.WorkerFrame, size: int) -> None:
        if request.done:
            return
        if size + _FRAME_BYTES > self._max_frame:  # refused alone, as gRPC refuses an oversize answer
            status = status_of(_too_large(), request_id=frame.response.request_id)
            frame = worker_pb2.WorkerFrame(error=status)
            size = status.ByteSize()
        out = self._out.add(size + _FRAME_BYTES)
        out.CopyFrom(frame)
        out.id = request.id
        self._finish(request)

    def _fail(self, request: _Request, err: AirlockError, request_id: str) -> None:
        frame = worker_pb2.WorkerFrame()
        frame.error.CopyFrom(status_of(err, request_id=request_id))
        self._send(request, frame, frame.error.ByteSize())

    def _finish(self, request: _Request) -> None:
        request.done = True
        self._requests.pop(request.id, None)
        self._ready.pop(request.id, None)
        self._out.wake()


def _too_large() -> QuotaExceededError:
    return QuotaExceededError("the answer is larger than the message limit", reason="QUOTA_EXCEEDED")


def _new_frame(batch: worker_pb2.WorkerFrames) -> worker_pb2.WorkerFrame:
    frame: worker_pb2.WorkerFrame = batch.frames.add()
    return frame
