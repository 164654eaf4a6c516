"""Quota stores: the same behaviour from the in-memory store and from Redis (a real redis-server).

Time-dependent refills are tested on the memory store with a fake clock; on Redis (whose own clock
times the scripts) rates are set so low that nothing refills during a test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from airlock.errors import QuotaExceededError, UnavailableError
from gateway.quota import (
    CONCURRENCY_LIMITED,
    RATE_LIMITED,
    TOKEN_QUOTA_EXCEEDED,
    MemoryQuotaStore,
    QuotaLimits,
    QuotaStore,
    RedisQuotaStore,
    Share,
)

SLOW = 1e-6  # a refill rate that adds nothing during a test


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    if request.param == "memory":
        yield MemoryQuotaStore(clock=Clock())
        return
    url = request.getfixturevalue("redis_url")
    redis_store = RedisQuotaStore(url, key_prefix=f"test:{uuid.uuid4().hex}")
    yield redis_store
    await redis_store.close()


def lease() -> str:
    return uuid.uuid4().hex


async def refused(store: QuotaStore, tenant: str, limits: QuotaLimits, tokens: int = 1) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as err:
        await store.acquire(tenant, limits, tokens, lease())
    return err.value


async def test_request_bucket_allows_the_burst_then_refuses_with_a_retry_delay(store: QuotaStore) -> None:
    limits = QuotaLimits(requests_per_second=0.5, burst=3)
    for _ in range(3):
        await store.acquire("acme", limits, 1, lease())
    err = await refused(store, "acme", limits)
    assert err.reason == RATE_LIMITED
    assert err.subject == "tenant:acme"
    assert err.retry_after is not None and 0 < err.retry_after <= 2.0  # one request at 0.5/s


async def test_tenants_have_separate_budgets(store: QuotaStore) -> None:
    limits = QuotaLimits(requests_per_second=SLOW, burst=1, tokens_per_minute=100, concurrent_streams=1)
    await store.acquire("acme", limits, 100, lease())
    assert (await refused(store, "acme", limits)).reason == CONCURRENCY_LIMITED
    await store.acquire("globex", limits, 100, lease())  # acme exhausted every dimension; globex none


async def test_tokens_are_reserved_at_admission_and_the_unused_part_refunded(store: QuotaStore) -> None:
    limits = QuotaLimits(tokens_per_minute=100)
    first = lease()
    await store.acquire("acme", limits, 60, first)
    err = await refused(store, "acme", limits, 60)  # 40 left while the first call runs
    assert err.reason == TOKEN_QUOTA_EXCEEDED and err.retry_after is not None and err.retry_after > 0
    await store.release("acme", limits, first, refund=55)  # it generated 5 of its 60
    await store.acquire("acme", limits, 60, lease())  # 95 left
    await refused(store, "acme", limits, 60)


async def test_a_refused_call_reserves_nothing(store: QuotaStore) -> None:
    limits = QuotaLimits(requests_per_second=SLOW, burst=2, tokens_per_minute=100)
    await store.acquire("acme", limits, 90, lease())
    assert (await refused(store, "acme", limits, 20)).reason == TOKEN_QUOTA_EXCEEDED
    # The refused call took no request from the bucket and no tokens: 1 request and 10 tokens remain.
    await store.acquire("acme", limits, 10, lease())
    assert (await refused(store, "acme", limits, 1)).reason == RATE_LIMITED


async def test_concurrency_slots_are_released(store: QuotaStore) -> None:
    limits = QuotaLimits(concurrent_streams=2)
    a, b = lease(), lease()
    await store.acquire("acme", limits, 1, a)
    await store.acquire("acme", limits, 1, b)
    err = await refused(store, "acme", limits)
    assert err.reason == CONCURRENCY_LIMITED and err.retry_after is not None
    await store.release("acme", limits, a, 0)
    await store.acquire("acme", limits, 1, lease())
    await refused(store, "acme", limits)


async def test_max_tokens_above_a_minute_of_quota_never_passes(store: QuotaStore) -> None:
    err = await refused(store, "acme", QuotaLimits(tokens_per_minute=100), 101)
    assert err.reason == TOKEN_QUOTA_EXCEEDED and err.retry_after is None  # waiting would not help


async def test_concurrent_admissions_cannot_overrun_the_token_budget(store: QuotaStore) -> None:
    limits = QuotaLimits(tokens_per_minute=1000, concurrent_streams=50)
    results = await asyncio.gather(
        *(store.acquire("acme", limits, 64, lease()) for _ in range(40)), return_exceptions=True
    )
    admitted = [r for r in results if r is None]
    assert len(admitted) == 1000 // 64  # 15 fit, never 16, however the calls interleave
    assert all(isinstance(r, QuotaExceededError) for r in results if r is not None)


async def test_unlimited_tenants_are_never_refused(store: QuotaStore) -> None:
    for _ in range(50):
        await store.acquire("acme", QuotaLimits(), 10_000, lease())


# --- memory store only: refills over (fake) time ---------------------------------------------------


async def test_request_bucket_refills_at_the_configured_rate() -> None:
    clock = Clock()
    store = MemoryQuotaStore(clock=clock)
    limits = QuotaLimits(requests_per_second=2, burst=2)
    await store.acquire("acme", limits, 1, lease())
    await store.acquire("acme", limits, 1, lease())
    err = await refused(store, "acme", limits)
    assert err.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    await store.acquire("acme", limits, 1, lease())
    clock.now += 100  # refills stop at the bucket size
    await store.acquire("acme", limits, 1, lease())
    await store.acquire("acme", limits, 1, lease())
    await refused(store, "acme", limits)


async def test_token_bucket_refills_per_minute_and_refunds_stop_at_its_size() -> None:
    clock = Clock()
    store = MemoryQuotaStore(clock=clock)
    limits = QuotaLimits(tokens_per_minute=60)
    first = lease()
    await store.acquire("acme", limits, 60, first)
    assert (await refused(store, "acme", limits, 30)).retry_after == pytest.approx(30)
    clock.now += 30
    await store.acquire("acme", limits, 30, lease())
    await store.release("acme", limits, first, 1000)  # a refund can't lift the bucket past its size
    await store.acquire("acme", limits, 60, lease())
    await refused(store, "acme", limits, 1)


# --- Redis only ------------------------------------------------------------------------------------


async def test_two_redis_stores_share_one_budget(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}"
    a = RedisQuotaStore(redis_url, key_prefix=prefix)
    b = RedisQuotaStore(redis_url, key_prefix=prefix)
    try:
        limits = QuotaLimits(requests_per_second=SLOW, burst=4, concurrent_streams=3)
        held = [lease() for _ in range(3)]
        await a.acquire("acme", limits, 1, held[0])
        await b.acquire("acme", limits, 1, held[1])
        await a.acquire("acme", limits, 1, held[2])
        assert (await refused(b, "acme", limits)).reason == CONCURRENCY_LIMITED
        await a.release("acme", limits, held[1], 0)  # any replica may release any lease
        await b.acquire("acme", limits, 1, lease())
        assert (await refused(a, "acme", limits)).reason in (RATE_LIMITED, CONCURRENCY_LIMITED)
    finally:
        await a.close()
        await b.close()


async def test_a_dead_replicas_slots_expire(redis_url: str) -> None:
    store = RedisQuotaStore(redis_url, key_prefix=f"test:{uuid.uuid4().hex}", lease_seconds=0.2)
    try:
        limits = QuotaLimits(concurrent_streams=1)
        await store.acquire("acme", limits, 1, lease())  # never released: its replica "died"
        await refused(store, "acme", limits)
        deadline = asyncio.get_running_loop().time() + 20
        while True:  # the lease expires 0.2 s later by Redis's clock
            try:
                await store.acquire("acme", limits, 1, lease())
                break
            except QuotaExceededError:
                assert asyncio.get_running_loop().time() < deadline, "the lease never expired"
                await asyncio.sleep(0.1)
    finally:
        await store.close()


async def test_an_unreachable_redis_fails_closed() -> None:
    from tests.redis_server import _free_port

    store = RedisQuotaStore(f"redis://:secret-pw@127.0.0.1:{_free_port()}/0")
    try:
        with pytest.raises(UnavailableError) as err:
            await store.acquire("acme", QuotaLimits(requests_per_second=5), 1, lease())
        assert err.value.reason == "QUOTA_STORE_UNAVAILABLE"
        assert "secret-pw" not in str(err.value)
        await store.release("acme", QuotaLimits(requests_per_second=5), lease(), 0)  # logged, no raise
    finally:
        await store.close()


async def test_release_now_frees_a_memory_slot_at_once_and_leaves_redis_to_await(store: QuotaStore) -> None:
    limits = QuotaLimits(concurrent_streams=1, tokens_per_minute=100)
    held = lease()
    await store.acquire("acme", limits, 10, held)
    done = store.release_now("acme", limits, held, 10)
    assert done == isinstance(store, MemoryQuotaStore)  # Redis needs a round trip: `release`
    if not done:
        await store.release("acme", limits, held, 10)
    await store.acquire("acme", limits, 100, lease())  # the slot and the 10 tokens came back
    assert store.release_now("acme", QuotaLimits(), lease(), 0)  # nothing reserved: nothing to wait for


@pytest.mark.parametrize(
    ("limits", "tokens", "expect"),
    [
        (QuotaLimits(concurrent_streams=5), 1, [3, 2]),  # 5 slots: 3 + 2
        (QuotaLimits(concurrent_streams=1), 1, [1, 0]),  # 1 slot: the second process refuses
        (QuotaLimits(requests_per_second=SLOW, burst=7), 1, [4, 3]),
        (QuotaLimits(tokens_per_minute=10), 1, [5, 5]),
        (QuotaLimits(tokens_per_minute=11), 2, [3, 2]),  # 6 and 5 tokens: whole calls of 2
    ],
)
async def test_processes_on_the_memory_store_split_each_budget_never_passing_more(
    limits: QuotaLimits, tokens: int, expect: list[int]
) -> None:
    admitted = []
    for index in range(2):
        store = MemoryQuotaStore(clock=Clock(), share=Share(index, 2))
        count = 0
        for _ in range(20):
            try:
                await store.acquire("acme", limits, tokens, lease())
                count += 1
            except QuotaExceededError:
                pass
        admitted.append(count)
    assert admitted == expect


async def test_a_call_larger_than_this_processs_share_of_tokens_says_so() -> None:
    store = MemoryQuotaStore(clock=Clock(), share=Share(1, 2))
    err = await refused(store, "acme", QuotaLimits(tokens_per_minute=100), 60)
    assert err.reason == TOKEN_QUOTA_EXCEEDED and err.retry_after is None
    assert "100/min; 50/min of it in this gateway process" in str(err)


def test_a_share_names_a_process_of_the_gateway() -> None:
    assert [Share(i, 3).part(10) for i in range(3)] == [4, 3, 3]
    assert Share(2, 3).rate(9.0) == 3.0
    with pytest.raises(ValueError):
        Share(2, 2)
