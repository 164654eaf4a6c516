"""The worker's end of the channel, spoken to raw (this test is the gateway): per-request credit with
merging and back-pressure on the engine, the deadline and cancellation in the frames, each open frame
checked like a unary call, only the gateway's certificate, and a drain that finishes what runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from airlock.types import GenerationSpec
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from tests.worker.served import Served, served_worker, words
from worker.channel import MERGE_DEPTH
from worker.engine import EngineOutput

Frame = worker_pb2.GatewayFrame


def send(call: Any, *frames: Frame) -> Any:
    return call.write(worker_pb2.GatewayFrames(frames=list(frames)))


def open_frame(id_: int, work: worker_pb2.WorkerRequest, *, stream: bool = False, credit: int = 0,
               timeout: float | None = None) -> Frame:  # fmt: skip
    frame = Frame(id=id_, open=worker_pb2.ChannelOpen(request=work, stream=stream, credit=credit))
    if timeout is not None:
        frame.open.timeout.FromNanoseconds(int(timeout * 1e9))
    return frame


async def opened(served: Served) -> Any:
    call = served.stub.Channel()
    hello = await call.read()
    assert list(hello.frames) == []  # the channel is open
    return call


async def frames_until(call: Any, done: Any) -> list[worker_pb2.WorkerFrame]:
    """Frames read until `done(frame)` says the last one came."""
    got: list[worker_pb2.WorkerFrame] = []
    while True:
        message = await asyncio.wait_for(call.read(), 30)
        assert message is not grpc.aio.EOF
        for frame in message.frames:
            got.append(frame)
            if done(frame):
                return got


def reason(status: Any) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def until_idle(served: Served) -> None:
    end = time.monotonic() + 10
    while served.engine.active and time.monotonic() < end:
        await asyncio.sleep(0.01)
    assert served.engine.active == 0


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with served_worker(tmp_path) as s:
        yield s


@pytest.fixture
async def paced(tmp_path: Path) -> AsyncIterator[Served]:
    async with served_worker(tmp_path, tokens_per_second=50) as s:
        yield s


async def test_a_stream_goes_as_far_as_its_credit_merges_meanwhile_and_then_stops_its_engine(
    served: Served,
) -> None:
    text = words(600)
    work, opener = served.work(text)
    call = await opened(served)
    await send(call, open_frame(1, work, stream=True, credit=1))  # one chunk (it overdraws)
    first = await frames_until(call, lambda f: f.id == 1)
    # Another request on the same stream is answered while the first has no credit left.
    other, other_opener = served.work("meanwhile on the same stream")
    await send(call, open_frame(2, other))
    got = first + await frames_until(call, lambda f: f.id == 2)
    chunks = [f.chunk for f in got if f.id == 1]
    [answer] = [f.response for f in got if f.id == 2]
    assert other_opener.open(answer.sealed_text).decode() == "meanwhile on the same stream"
    assert len(chunks) == 1 and not chunks[-1].finish_reason  # no more than its credit
    sent = sum(c.tokens for c in chunks)
    await asyncio.sleep(0.2)  # the engine is no longer read: what it made stays within the bound
    produced = served.engine.produced_tokens - 5
    assert served.engine.active == 1 and produced < 600 and produced <= sent + MERGE_DEPTH
    await send(call, Frame(id=1, credit=worker_pb2.ChannelCredit(bytes=1 << 20)))
    chunks += [f.chunk for f in await frames_until(call, lambda f: f.id == 1 and f.chunk.finish_reason)]
    assert "".join(opener.open(c.sealed_text).decode() for c in chunks) == text
    opener.finish()
    assert len(chunks) < 100  # what waited for credit came merged, not one chunk per token
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP and chunks[-1].usage.completion_tokens == 600
    assert sum(c.tokens for c in chunks) == 600
    call.cancel()


async def test_the_worker_enforces_the_deadline_it_was_given(paced: Served) -> None:
    work, _ = paced.work(words(200))
    call = await opened(paced)
    await send(call, open_frame(7, work, timeout=0.3))
    [frame] = await frames_until(call, lambda f: f.id == 7)
    assert frame.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert reason(frame.error) == "DEADLINE_EXCEEDED"
    await until_idle(paced)  # the engine was stopped, not left to finish 200 tokens
    assert paced.engine.produced_tokens < 200
    call.cancel()


async def test_a_cancel_frame_aborts_the_engine_and_the_stream_goes_on(paced: Served) -> None:
    work, _ = paced.work(words(200))
    call = await opened(paced)
    await send(call, open_frame(1, work, stream=True, credit=1 << 16))
    await frames_until(call, lambda f: f.id == 1)
    await send(call, Frame(id=1, cancel=worker_pb2.ChannelCancel()))
    await until_idle(paced)
    produced = paced.engine.produced_tokens
    assert produced < 200
    again, opener = paced.work("still open")
    await send(call, open_frame(2, again))
    got = await frames_until(call, lambda f: f.id == 2)
    assert opener.open(got[-1].response.sealed_text).decode() == "still open"
    call.cancel()


async def test_when_the_stream_ends_its_requests_are_aborted(paced: Served) -> None:
    work, _ = paced.work(words(200))
    call = await opened(paced)
    await send(call, open_frame(1, work, stream=True, credit=1 << 16))
    await frames_until(call, lambda f: f.id == 1)
    call.cancel()  # the gateway went away (or the connection did)
    await until_idle(paced)


async def test_each_open_frame_is_checked_like_a_unary_call(served: Served) -> None:
    call = await opened(served)
    other_tenant, _ = served.work("hi", tenant="globex")
    plaintext = worker_pb2.WorkerRequest(tenant="acme")
    plaintext.request.request_id = "plain-1"
    plaintext.request.messages.add(role="user", content="in the clear")
    bad_id, _ = served.work("hi")
    bad_id.request.request_id = "bad id with spaces"
    good, opener = served.work("fine")
    await send(call, open_frame(1, other_tenant), open_frame(2, plaintext), open_frame(3, bad_id),
               open_frame(4, good))  # fmt: skip
    got = {f.id: f for f in await frames_until(call, lambda f: f.id == 4)}
    denied, invalid = grpc.StatusCode.PERMISSION_DENIED.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (got[1].error.code, reason(got[1].error)) == (denied, "WRONG_TENANT")
    assert (got[2].error.code, reason(got[2].error)) == (invalid, "PLAINTEXT_REFUSED")
    assert reason(got[3].error) == "REQUEST_ID_INVALID"
    assert opener.open(got[4].response.sealed_text).decode() == "fine"
    # An id still in use is not a frame the gateway sends: the channel ends, refused.
    slow, _ = served.work(words(600))
    await send(call, open_frame(5, slow, stream=True, credit=1), open_frame(5, slow, stream=True, credit=1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await until_idle(served)


async def test_only_the_gateway_may_open_a_channel(served: Served) -> None:
    credentials = grpc.ssl_channel_credentials(
        served.pki.ca_cert.read_bytes(),
        served.pki.worker_key.read_bytes(),
        served.pki.worker_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(served.address, credentials) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Channel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_draining_worker_answers_what_runs_refuses_what_comes_and_ends_the_stream(
    paced: Served,
) -> None:
    work, opener = paced.work(words(20))
    call = await opened(paced)
    await send(call, open_frame(1, work, stream=True, credit=1 << 20))
    chunks = [f.chunk for f in await frames_until(call, lambda f: f.id == 1)]
    paced.service.drain()
    late, _ = paced.work("too late")
    await send(call, open_frame(2, late))
    got = await frames_until(call, lambda f: f.id == 1 and f.chunk.finish_reason)
    chunks += [f.chunk for f in got if f.id == 1]
    refusals = [f for f in got if f.id == 2]
    if not refusals:
        refusals = await frames_until(call, lambda f: f.id == 2)
    assert refusals[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "".join(opener.open(c.sealed_text).decode() for c in chunks) == words(20)
    assert await call.read() is grpc.aio.EOF  # nothing left: the worker ends the stream
    assert await call.code() == grpc.StatusCode.OK


class Oversized:
    """An engine whose one output is larger than any message may be."""

    kind, produced_tokens, active = "oversized", 0, 0

    async def generate(self, spec: GenerationSpec, *, tenant: str = "") -> AsyncIterator[EngineOutput]:
        yield EngineOutput(text="x" * (64 << 10), tokens=1)
        yield EngineOutput(text="", tokens=0, finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    async def abort(self, request_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_an_answer_larger_than_a_message_fails_alone_and_the_stream_goes_on(tmp_path: Path) -> None:
    async with served_worker(tmp_path, engine=Oversized(), max_message_bytes=32 << 10) as served:
        call = await opened(served)
        unary, _ = served.work("hi")
        stream, _ = served.work("hi")
        await send(call, open_frame(1, unary), open_frame(2, stream, stream=True, credit=1 << 16))
        got = {f.id: f for f in await frames_until(call, lambda f: f.id == 2)}
        got |= {f.id: f for f in await frames_until(call, lambda f: f.id == 1)} if 1 not in got else {}
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert (got[1].error.code, reason(got[1].error)) == (exhausted, "QUOTA_EXCEEDED")
        assert (got[2].error.code, reason(got[2].error)) == (exhausted, "QUOTA_EXCEEDED")
        served.service.engine = served.engine  # the stream is still open: an echo on it is answered
        fine, opener = served.work("fine")
        await send(call, open_frame(3, fine))
        answer = await frames_until(call, lambda f: f.id == 3)
        assert opener.open(answer[-1].response.sealed_text).decode() == "fine"
        call.cancel()
