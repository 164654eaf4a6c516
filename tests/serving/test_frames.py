"""The outbox of a channel's one writer: frames in order, what piled up taken as one batch, batches
cut at the size bound, and a wait that ends when something is added or the writer is woken."""

from __future__ import annotations

import asyncio

from airlock.v1 import worker_pb2
from serving.frames import Outbox


def outbox(limit: int = 1000) -> Outbox[worker_pb2.GatewayFrames, worker_pb2.GatewayFrame]:
    return Outbox(worker_pb2.GatewayFrames, lambda batch: batch.frames.add(), limit=limit)


def ids(batch: worker_pb2.GatewayFrames | None) -> list[int]:
    assert batch is not None
    return [f.id for f in batch.frames]


async def test_what_piled_up_is_one_batch_in_order() -> None:
    out = outbox()
    assert not out and out.take() is None
    for i in range(1, 4):
        out.add(10).id = i
    assert out and ids(out.take()) == [1, 2, 3]
    assert not out and out.take() is None


async def test_a_batch_is_cut_at_the_size_bound() -> None:
    out = outbox(limit=100)
    for i in range(1, 6):
        out.add(40).id = i
    out.add(500).id = 6  # bigger than the bound: a batch of its own
    out.add(10).id = 7
    assert [ids(out.take()) for _ in range(5)] == [[1, 2], [3, 4], [5], [6], [7]]
    assert out.take() is None


async def test_a_wait_ends_when_a_frame_is_added_or_the_writer_is_woken() -> None:
    out = outbox()
    waiting = asyncio.create_task(out.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    out.add(10).id = 1
    await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(out.wait(), 5)  # frames are waiting: at once
    out.take()
    woken = asyncio.create_task(out.wait())
    await asyncio.sleep(0)
    out.wake()
    await asyncio.wait_for(woken, 5)
