"""The gateway's end of the channel: a slow reader next to a fast one on the same stream, cancellation
and deadlines reaching the engine (a real worker in process); a broken stream failing only its own
requests, UNAVAILABLE, and opened again; a worker sending past its credit (a scripted worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2, worker_pb2_grpc
from control.pki import ensure_dev_pki
from gateway.channel import CREDIT, TOKEN_CHANNEL_OPTIONS, Exchange, WorkerChannel
from serving.rpc import bind, new_server
from tests.worker.served import Served, gateway_credentials, served_worker, words
from worker.channel import MERGE_BYTES


async def until(check: object, what: str, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, what
        await asyncio.sleep(0.01)


async def read_all(exchange: Exchange) -> list[pb.GenerateChunk]:
    chunks: list[pb.GenerateChunk] = []
    while batch := await exchange.chunks():
        chunks += batch
    return chunks


@pytest.fixture
async def paced(tmp_path: Path) -> AsyncIterator[Served]:
    async with served_worker(tmp_path, tokens_per_second=50) as s:
        yield s


@pytest.mark.parametrize("lane", ["shared", "tokens"])
async def test_a_slow_reader_holds_up_only_its_own_request(tmp_path: Path, lane: str) -> None:
    async with served_worker(tmp_path) as served:  # an engine that never waits: only flow control does
        if lane == "shared":
            await slow_next_to_fast(served, WorkerChannel(served.channel, streams=1))
        else:  # the gateway's: streams on a channel whose window holds about one message
            async with token_channel(served) as tokens:
                await slow_next_to_fast(served, WorkerChannel(served.channel, tokens=tokens, streams=1))


@asynccontextmanager
async def token_channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    credentials = gateway_credentials(served.pki)
    async with grpc.aio.secure_channel(served.address, credentials, options=TOKEN_CHANNEL_OPTIONS) as tokens:
        yield tokens


async def slow_next_to_fast(served: Served, channel: WorkerChannel) -> None:
    # both requests on the same stream; chunks of up to MERGE_BYTES, many times the token window
    long = "s" + "x" * 40  # 3000 words of ~45 bytes: more than the credit and the worker's bound
    slow_work, slow_opener = served.work(words(3000, long))
    fast_work, fast_opener = served.work(words(600, "f"))
    slow = await channel.open(slow_work, stream=True, deadline=None)
    first = await slow.chunks()  # it started; then its caller stops reading
    fast = await channel.open(fast_work, stream=True, deadline=None)
    fast_chunks = await read_all(fast)
    assert "".join(fast_opener.open(c.sealed_text).decode() for c in fast_chunks) == words(600, "f")
    # The slow one: the gateway holds no more than its credit (and the chunk that overdrew it), the
    # worker merged up to its bound and then stopped reading that engine (running, paused, far from done).
    await asyncio.sleep(0.3)
    held = slow.buffered
    produced = served.engine.produced_tokens
    await asyncio.sleep(0.3)
    assert held == slow.buffered <= CREDIT + MERGE_BYTES + 64 and served.engine.produced_tokens == produced
    assert served.engine.active == 1 and produced - 600 < 3000
    rest = await read_all(slow)  # it reads again: everything arrives, in order
    text = "".join(slow_opener.open(c.sealed_text).decode() for c in first + rest)
    assert text == words(3000, long)
    slow_opener.finish()
    assert rest[-1].finish_reason == pb.FINISH_REASON_STOP and rest[-1].usage.completion_tokens == 3000
    await channel.close()


async def test_closing_an_exchange_aborts_the_engine(paced: Served) -> None:
    channel = WorkerChannel(paced.channel)
    work, _ = paced.work(words(200))
    exchange = await channel.open(work, stream=True, deadline=None)
    await exchange.chunks()
    exchange.close()  # the caller went away
    await until(lambda: paced.engine.active == 0, "the engine was not aborted")
    produced = paced.engine.produced_tokens
    assert produced < 200
    work, opener = paced.work("the channel goes on")
    answer = await (await channel.open(work, stream=False, deadline=None)).response()
    assert opener.open(answer.sealed_text).decode() == "the channel goes on"
    await channel.close()


async def test_a_deadline_fails_the_request_and_stops_the_engine(paced: Served) -> None:
    channel = WorkerChannel(paced.channel)
    work, _ = paced.work(words(200))
    exchange = await channel.open(work, stream=False, deadline=time.monotonic() + 0.3)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await exchange.response()
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: paced.engine.active == 0, "the engine was not stopped")
    with pytest.raises(grpc.aio.AioRpcError) as past:
        await channel.open(work, stream=False, deadline=time.monotonic() - 1)
    assert past.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await channel.close()


class Scripted(worker_pb2_grpc.WorkerServicer):
    """A worker that says hello on each channel and then does what the test tells that call."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Queue[worker_pb2.WorkerFrames | None]] = []
        self.opened: list[tuple[int, int]] = []  # (call, frame id)
        self.peers: list[str] = []  # of each call: which connection it came on
        self.address = ""

    async def Channel(
        self, requests: AsyncIterator[worker_pb2.GatewayFrames], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerFrames]:
        n = len(self.calls)
        script: asyncio.Queue[worker_pb2.WorkerFrames | None] = asyncio.Queue()
        self.calls.append(script)
        self.peers.append(context.peer())

        async def read() -> None:
            async for message in requests:
                self.opened += [(n, f.id) for f in message.frames if f.HasField("open")]

        reader = asyncio.create_task(read())
        try:
            yield worker_pb2.WorkerFrames()
            while (step := await script.get()) is not None:
                yield step
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker went away")
        finally:
            reader.cancel()


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[Scripted, grpc.aio.Channel]]:
    pki = ensure_dev_pki(tmp_path)
    server, _ = new_server([], [], max_message_bytes=1 << 20)
    worker = Scripted()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.worker_key.read_bytes(), pki.worker_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True,
    )  # fmt: skip
    port = bind(server, "127.0.0.1:0", credentials)
    worker.address = f"127.0.0.1:{port}"
    await server.start()
    client = gateway_credentials(pki)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client) as channel:
        yield worker, channel
    await server.stop(None)


def chunk(id_: int, text: str, *, final: bool = False) -> worker_pb2.WorkerFrames:
    frame = worker_pb2.WorkerFrame(id=id_, chunk=pb.GenerateChunk(text=text, tokens=1))
    if final:
        frame.chunk.finish_reason = pb.FINISH_REASON_STOP
    return worker_pb2.WorkerFrames(frames=[frame])


async def test_a_broken_stream_fails_only_its_requests_and_is_opened_again(
    scripted: tuple[Scripted, grpc.aio.Channel],
) -> None:
    worker, grpc_channel = scripted
    channel = WorkerChannel(grpc_channel, streams=2)
    published: asyncio.Queue[bool] = asyncio.Queue()

    async def changed() -> None:
        await published.put(channel.is_open)

    stop = asyncio.Event()
    keeper = asyncio.create_task(channel.keep_open(stop, changed))
    assert await asyncio.wait_for(published.get(), 30) is True  # both streams open
    stop.set()
    await keeper  # the streams stay open for the requests
    work = worker_pb2.WorkerRequest(tenant="acme")
    before = await channel.open(work, stream=True, deadline=None)  # stream 0: fails before any output
    other = await channel.open(work, stream=True, deadline=None)  # stream 1
    after = await channel.open(work, stream=True, deadline=None)  # stream 0 again: fails after one
    await until(lambda: len(worker.opened) == 3, "the open frames did not arrive")
    assert sorted(worker.opened) == [(0, before.id), (0, after.id), (1, other.id)]
    await worker.calls[0].put(chunk(after.id, "one"))
    assert [c.text for c in await after.chunks()] == ["one"]
    await worker.calls[0].put(None)  # stream 0 breaks
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await before.chunks()
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await after.chunks()
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    # Stream 1's request goes on untouched.
    await worker.calls[1].put(chunk(other.id, "still here", final=True))
    assert [c.text for c in await read_all(other)] == ["still here"]
    # Both streams lost: the next request opens one again.
    await worker.calls[1].put(None)
    await until(lambda: not channel.is_open, "the lost streams still count as open")
    again = await channel.open(work, stream=False, deadline=None)
    assert len(worker.calls) == 3 and channel.is_open
    answer = worker_pb2.WorkerFrame(id=again.id, response=pb.GenerateResponse(text="reopened"))
    await worker.calls[2].put(worker_pb2.WorkerFrames(frames=[answer]))
    assert (await again.response()).text == "reopened"
    await channel.close()


async def test_a_worker_that_sends_past_its_credit_fails_that_request(
    scripted: tuple[Scripted, grpc.aio.Channel],
) -> None:
    worker, grpc_channel = scripted
    channel = WorkerChannel(grpc_channel, streams=1)
    exchange = await channel.open(worker_pb2.WorkerRequest(tenant="acme"), stream=True, deadline=None)
    await until(lambda: worker.opened, "the open frame did not arrive")
    for i in range(CREDIT // (16 << 10) + 1):  # a fifth chunk of 16 KiB: past a credit of 64 KiB
        await worker.calls[0].put(chunk(exchange.id, f"{i}" * (16 << 10)))
    await until(lambda: exchange.ended, "the request was not failed")
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await read_all(exchange)
    assert broken.value.code() == grpc.StatusCode.INTERNAL
    await channel.close()


async def test_a_worker_that_is_not_there_is_unavailable(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path)
    client = gateway_credentials(pki)
    async with grpc.aio.secure_channel("127.0.0.1:9", client) as grpc_channel:
        channel = WorkerChannel(grpc_channel)
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await channel.open(worker_pb2.WorkerRequest(tenant="acme"), stream=False, deadline=None)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE and not channel.is_open
        await channel.close()


async def test_a_request_larger_than_the_workers_limit_is_refused_alone(
    scripted: tuple[Scripted, grpc.aio.Channel],
) -> None:
    worker, grpc_channel = scripted
    channel = WorkerChannel(grpc_channel, streams=1, max_message_bytes=4096)
    large = worker_pb2.WorkerRequest(tenant="acme")
    large.request.messages.add(role="user", content="x" * 8192)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.open(large, stream=False, deadline=None)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = await channel.open(worker_pb2.WorkerRequest(tenant="acme"), stream=False, deadline=None)
    await until(lambda: worker.opened, "the open frame did not arrive")
    assert worker.opened == [(0, small.id)]  # the large one was never sent
    await channel.close()


async def test_streams_take_the_token_channel_and_answers_the_other(
    scripted: tuple[Scripted, grpc.aio.Channel], tmp_path: Path
) -> None:
    worker, grpc_channel = scripted
    client = gateway_credentials(ensure_dev_pki(tmp_path))
    tokens = grpc.aio.secure_channel(worker.address, client, options=TOKEN_CHANNEL_OPTIONS)
    channel = WorkerChannel(grpc_channel, tokens=tokens, streams=1)
    work = worker_pb2.WorkerRequest(tenant="acme")
    answer = await channel.open(work, stream=False, deadline=None)
    streamed = await channel.open(work, stream=True, deadline=None)
    another = await channel.open(work, stream=True, deadline=None)
    await until(lambda: len(worker.opened) == 3, "the open frames did not arrive")
    assert sorted(worker.opened) == [(0, answer.id), (1, streamed.id), (1, another.id)]
    assert worker.peers[0] != worker.peers[1]  # two connections
    await channel.close()
    assert tokens.get_state() == grpc.ChannelConnectivity.SHUTDOWN  # closed with the worker channel
