"""Per-tenant quotas: requests/s (token bucket), tokens/min (token bucket) and concurrent calls.

A request reserves everything it may use in one atomic step at admission (one request, its
`max_tokens`, one concurrency slot) or nothing at all, so concurrent requests can't overrun a
budget; at the end the slot is released and the unused tokens are refunded. `MemoryQuotaStore`
serves one process; `RedisQuotaStore` shares the state of several (replicas, and the processes of
one gateway) through Redis, with each step one Lua script (atomic on the server, timed by the
server's clock so replicas agree).

`Share` splits every tenant's budget between N processes on the memory store: each gets rate/N
and its part of burst, tokens per minute and concurrent streams, the parts adding up to the
policy's, never more; a part of 0 refuses in that process. A gateway of N processes
(`gateway.processes`, gateway/group.py) gives process I `Share(I, N)`; a gateway of one, the whole.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from airlock.errors import QuotaExceededError, UnavailableError

__all__ = [
    "CONCURRENCY_LIMITED",
    "RATE_LIMITED",
    "TOKEN_QUOTA_EXCEEDED",
    "WHOLE",
    "Bucket",
    "MemoryQuotaStore",
    "QuotaLimits",
    "QuotaStore",
    "RedisQuotaStore",
    "Share",
    "quota_error",
]

RATE_LIMITED = "RATE_LIMITED"
TOKEN_QUOTA_EXCEEDED = "TOKEN_QUOTA_EXCEEDED"
CONCURRENCY_LIMITED = "CONCURRENCY_LIMITED"
# A full concurrency pool frees up when some call ends, which nobody can predict: a short hint.
CONCURRENCY_RETRY_SECONDS = 1.0
_log = logging.getLogger("airlock.quota")


@dataclass(frozen=True)
class QuotaLimits:
    """One tenant's limits (policy/tenants.toml); 0 means that dimension is not limited."""

    requests_per_second: float = 0.0
    burst: int = 0  # the request bucket's size; 0: max(1, ceil(requests_per_second))
    tokens_per_minute: int = 0
    concurrent_streams: int = 0

    @property
    def bucket(self) -> float:
        return float(self.burst or max(1, math.ceil(self.requests_per_second)))

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_second or self.tokens_per_minute or self.concurrent_streams)


@dataclass(frozen=True)
class Share:
    """This process's part of every tenant's budget when `count` gateway processes split it (the
    memory store, and each process's request gate): rates are divided by `count`; whole amounts are
    split so that the parts add up to the whole, the first `whole % count` processes taking one more.
    Never more than the policy in total; a process whose part of a limited amount is 0 refuses."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"process {self.index} of {self.count}")

    def rate(self, per_second: float) -> float:
        return per_second / self.count

    def part(self, whole: int) -> int:
        quotient, remainder = divmod(whole, self.count)
        return quotient + (1 if self.index < remainder else 0)


WHOLE = Share()  # one process: the whole budget

_MESSAGES = {
    RATE_LIMITED: "request rate quota exceeded for this tenant",
    TOKEN_QUOTA_EXCEEDED: "token quota exceeded for this tenant",
    CONCURRENCY_LIMITED: "too many concurrent calls for this tenant",
}


def quota_error(reason: str, retry_after: float | None, tenant: str) -> QuotaExceededError:
    return QuotaExceededError(
        _MESSAGES[reason], reason=reason, retry_after=retry_after, subject=f"tenant:{tenant}"
    )


class QuotaStore(Protocol):
    async def acquire(self, tenant: str, limits: QuotaLimits, tokens: int, lease: str) -> None:
        """Reserve one request, `tokens` tokens and one slot under `lease`, or raise
        `QuotaExceededError` having reserved nothing (`UnavailableError` if the store is down)."""

    async def release(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> None:
        """Free the slot of `lease` and give back `refund` unused tokens."""

    def release_now(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> bool:
        """`release`, done before this returns when the store needs no waiting for it (True);
        False: nothing was done, await `release`."""

    async def close(self) -> None: ...


def _too_large(
    tenant: str, limits: QuotaLimits, tokens: int, share: Share | None = None
) -> QuotaExceededError | None:
    """A request asking for more than a whole minute's tokens can never pass: no retry hint."""
    tpm, share = limits.tokens_per_minute, share or WHOLE
    if tpm and tokens > share.part(tpm):
        mine = "" if share.count == 1 else f"; {share.part(tpm)}/min of it in this gateway process"
        return QuotaExceededError(
            f"max_tokens {tokens} exceeds this tenant's token quota ({tpm}/min{mine})",
            reason=TOKEN_QUOTA_EXCEEDED,
            subject=f"tenant:{tenant}",
        )
    return None


@dataclass
class Bucket:
    """A token bucket: `level` tokens at time `at`, refilled at a rate up to a size."""

    level: float
    at: float

    def refill(self, now: float, rate: float, size: float) -> float:
        self.level = min(size, self.level + max(0.0, now - self.at) * rate)
        self.at = now
        return self.level


@dataclass
class _TenantState:
    requests: Bucket | None = None
    tokens: Bucket | None = None
    leases: set[str] = field(default_factory=set)


class MemoryQuotaStore:
    """Quota state of one gateway process (its `share` of each budget when several split it); every
    method runs without awaiting, so it is atomic on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, share: Share | None = None) -> None:
        self._clock = clock
        self.share = share or WHOLE
        self._tenants: dict[str, _TenantState] = {}

    def _now(self) -> float:
        return self._clock()

    async def acquire(self, tenant: str, limits: QuotaLimits, tokens: int, lease: str) -> None:
        share = self.share
        if (refusal := _too_large(tenant, limits, tokens, share)) is not None:
            raise refusal
        now = self._now()
        state = self._tenants.setdefault(tenant, _TenantState())
        if limits.concurrent_streams and len(state.leases) >= share.part(limits.concurrent_streams):
            raise quota_error(CONCURRENCY_LIMITED, CONCURRENCY_RETRY_SECONDS, tenant)
        # Rates and sizes are this process's part; whether a dimension is limited is the policy's.
        rps, tpm = share.rate(limits.requests_per_second), share.part(limits.tokens_per_minute)
        if rps:
            size = float(share.part(int(limits.bucket)))
            state.requests = state.requests or Bucket(size, now)
            level = state.requests.refill(now, rps, size)
            if level < 1:
                raise quota_error(RATE_LIMITED, (1 - level) / rps, tenant)
        if limits.tokens_per_minute:  # a part of 0 admits only what asks for no tokens (_too_large)
            state.tokens = state.tokens or Bucket(float(tpm), now)
            level = state.tokens.refill(now, tpm / 60, tpm)
            if level < tokens:
                raise quota_error(TOKEN_QUOTA_EXCEEDED, (tokens - level) / (tpm / 60), tenant)
        if rps and state.requests is not None:
            state.requests.level -= 1
        if tpm and state.tokens is not None:
            state.tokens.level -= tokens
        if limits.concurrent_streams:
            state.leases.add(lease)

    async def release(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> None:
        self.release_now(tenant, limits, lease, refund)

    def release_now(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> bool:
        state = self._tenants.get(tenant)
        if state is None:
            return True
        state.leases.discard(lease)
        tpm = self.share.part(limits.tokens_per_minute)
        if refund > 0 and tpm and state.tokens is not None:
            state.tokens.refill(self._now(), tpm / 60, tpm)
            state.tokens.level = min(float(tpm), state.tokens.level + refund)
        return True

    def in_flight(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return len(state.leases) if state else 0

    async def close(self) -> None:
        return None


# Buckets are hashes {level, ts}; slots a sorted set of lease ids scored by expiry, so a replica
# that dies holding slots loses them after `lease_seconds` instead of shrinking the pool forever.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, rate, size)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or ts == nil then return size end
  return math.min(size, lvl + math.max(0, now - ts) * rate)
end
local function store(key, lvl, rate, size)
  redis.call('HSET', key, 'level', tostring(lvl), 'ts', tostring(now))
  redis.call('EXPIRE', key, math.ceil(size / rate) + 60)
end
"""

_ACQUIRE = (
    _PRELUDE
    + """
local rps, bucket = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local slots, lease, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= slots then return {'CONCURRENCY_LIMITED', '-1'} end
end
local rl, tl = 0, 0
if rps > 0 then
  rl = level(KEYS[1], rps, bucket)
  if rl < 1 then return {'RATE_LIMITED', tostring((1 - rl) / rps)} end
end
if tpm > 0 then
  tl = level(KEYS[2], tpm / 60, tpm)
  if tl < cost then return {'TOKEN_QUOTA_EXCEEDED', tostring((cost - tl) / (tpm / 60))} end
end
if rps > 0 then store(KEYS[1], rl - 1, rps, bucket) end
if tpm > 0 then store(KEYS[2], tl - cost, tpm / 60, tpm) end
if slots > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  redis.call('EXPIRE', KEYS[3], math.ceil(ttl) + 60)
end
return {'', '0'}
"""
)

_RELEASE = (
    _PRELUDE
    + """
local tpm, refund, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZREM', KEYS[3], lease)
if tpm > 0 and refund > 0 then
  store(KEYS[2], math.min(tpm, level(KEYS[2], tpm / 60, tpm) + refund), tpm / 60, tpm)
end
return 1
"""
)


class RedisQuotaStore:
    """Quota state shared by every gateway replica pointed at the same Redis and key prefix.

    If Redis can't be reached, admission fails closed (`UNAVAILABLE`): no call runs unmetered."""

    def __init__(self, url: str, *, key_prefix: str = "airlock:quota", lease_seconds: float = 600.0) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = key_prefix
        self._lease_seconds = lease_seconds
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:{{{tenant}}}"  # one hash slot per tenant (Redis Cluster friendly)
        return [f"{base}:requests", f"{base}:tokens", f"{base}:leases"]

    async def acquire(self, tenant: str, limits: QuotaLimits, tokens: int, lease: str) -> None:
        if (refusal := _too_large(tenant, limits, tokens)) is not None:
            raise refusal
        if limits.unlimited:
            return
        args: list[str | float] = [
            limits.requests_per_second, limits.bucket, limits.tokens_per_minute, tokens,
            limits.concurrent_streams, lease, self._lease_seconds,
        ]  # fmt: skip
        try:
            reason, wait = await self._acquire(keys=self._keys(tenant), args=args)
        except RedisError as exc:
            # The URL may hold a password: name the error type only.
            _log.error("quota store unreachable; refusing the call: %s", type(exc).__name__)
            raise UnavailableError(
                "quota store unavailable; retry later", reason="QUOTA_STORE_UNAVAILABLE"
            ) from None
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if reason:
            seconds = float(wait)
            raise quota_error(reason, CONCURRENCY_RETRY_SECONDS if seconds < 0 else seconds, tenant)

    def release_now(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> bool:
        return limits.unlimited  # nothing was reserved; anything else is a round trip to Redis

    async def release(self, tenant: str, limits: QuotaLimits, lease: str, refund: int) -> None:
        if limits.unlimited:
            return
        try:
            await self._release(keys=self._keys(tenant), args=[limits.tokens_per_minute, refund, lease])
        except RedisError as exc:  # the slot expires after lease_seconds; the refund is lost
            _log.error("quota release failed (slot expires by itself): %s", type(exc).__name__)

    async def close(self) -> None:
        await self._redis.aclose()
