"""Batches of a stream: order kept, nothing held back from a consumer that keeps up, what piled up
merged for one that doesn't, bounded, errors in their place, and a reader that stops with the
consumer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.streams import batches


async def produce(items: list[str], fail: Exception | None = None) -> AsyncIterator[str]:
    for item in items:
        await asyncio.sleep(0)  # like an engine between steps
        yield item
    if fail is not None:
        raise fail


async def test_a_consumer_that_keeps_up_gets_every_item_as_it_comes() -> None:
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[str]:
        for item in "abc":
            await gate.wait()
            gate.clear()
            yield item

    got: list[list[str]] = []
    stream = batches(slow())
    for _ in range(3):
        gate.set()
        got.append(await anext(stream))
    gate.set()
    assert [b async for b in stream] == []
    assert got == [["a"], ["b"], ["c"]]


async def test_what_piled_up_while_the_consumer_was_busy_comes_as_one_batch() -> None:
    items = [str(i) for i in range(50)]
    got: list[list[str]] = []
    async for batch in batches(produce(items)):
        got.append(batch)
        await asyncio.sleep(0.01)  # a slow consumer: the reader runs ahead meanwhile
    assert [i for b in got for i in b] == items
    assert len(got) < 10 and max(len(b) for b in got) > 1


async def test_batches_are_bounded_by_depth_and_bytes() -> None:
    items = [str(i % 10) * 10 for i in range(40)]
    got: list[list[str]] = []
    async for batch in batches(produce(items), depth=8, max_bytes=35, size=len):
        got.append(batch)
        await asyncio.sleep(0.01)
    assert [i for b in got for i in b] == items
    assert max(len(b) for b in got) <= 3  # 3 x 10 bytes fit in 35, a fourth doesn't
    assert sum(len(b) == 3 for b in got) > 1


async def test_an_item_over_the_byte_bound_still_comes_alone() -> None:
    got = [b async for b in batches(produce(["x" * 100, "y"]), max_bytes=10, size=len)]
    assert [i for b in got for i in b] == ["x" * 100, "y"]


async def test_an_error_comes_after_every_item_before_it() -> None:
    got: list[str] = []
    with pytest.raises(RuntimeError, match="worker went away"):
        async for batch in batches(produce(list("abcd"), RuntimeError("worker went away"))):
            got.extend(batch)
            await asyncio.sleep(0.01)
    assert got == list("abcd")


async def test_a_cancelled_source_is_raised_not_waited_for() -> None:
    with pytest.raises(asyncio.CancelledError):
        async for _ in batches(produce(["a"], asyncio.CancelledError())):
            pass


async def test_leaving_early_stops_the_reader_before_the_source_is_closed() -> None:
    finished = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0)
                yield i
                i += 1
        finally:
            finished.set()

    for depth in (1, 4, 64):  # the reader stopped inside the source, or waiting on a full queue
        finished.clear()
        source = endless()
        stream = batches(source, depth=depth)
        await anext(stream)
        await stream.aclose()
        await source.aclose()  # the reader was waited for: not "already running"
        assert finished.is_set()
