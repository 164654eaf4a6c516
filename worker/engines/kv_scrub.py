"""KV scrubbing on a shared engine: tenant switches wait for the previous tenant's requests to
drain, then scrub the engine's caches before the next tenant's request runs.

vLLM does not zero KV blocks when a request ends. On a shared vLLM worker the gate below makes a
tenant switch wait until no request of the previous tenant is in flight, then resets the prefix
cache and zeroes every KV cache tensor on every vLLM worker (`collective_rpc` into
`KvScrubExtension`, which vLLM mixes into its GPU worker class via `worker_extension_cls`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

__all__ = ["KV_SCRUB_METHOD", "KvScrubExtension", "TenantGate", "zero_tensors"]

KV_SCRUB_METHOD = "airlock_zero_kv_cache"


def zero_tensors(value: Any) -> int:
    """Zero every tensor in `value` (a tensor, or lists, tuples and dicts of them); returns bytes."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel():
            value.zero_()
        return int(value.numel() * value.element_size())
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(zero_tensors(v) for v in value)
    return 0


class KvScrubExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `collective_rpc(KV_SCRUB_METHOD)`
    runs it on every worker of the engine (every GPU of a tensor-parallel group)."""

    def airlock_zero_kv_cache(self) -> int:
        import torch

        runner = getattr(self, "model_runner", None)
        if runner is None:
            raise RuntimeError("this vLLM worker has no model runner to scrub")
        zeroed = zero_tensors(getattr(runner, "kv_caches", []))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the zeroing has landed before the next request is scheduled
        return zeroed


class TenantGate:
    """Admits requests in arrival order; one tenant owns the engine at a time.

    A request of the owning tenant runs at once unless another tenant is already waiting (no
    starvation: it queues behind). A request of another tenant waits until none of the owner's
    requests are in flight, then `scrub()` runs, and only a scrub that succeeded hands the engine
    over; a failing scrub fails that request and leaves the owner as it was, so the next switch
    scrubs again (fail closed).
    """

    def __init__(self, scrub: Callable[[], Awaitable[None]]) -> None:
        self._scrub = scrub
        self._cond = asyncio.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self.owner: str | None = None
        self.running = 0
        self.switches = 0

    @contextlib.asynccontextmanager
    async def enter(self, tenant: str) -> AsyncIterator[None]:
        await self._acquire(tenant)
        try:
            yield
        finally:
            async with self._cond:
                self.running -= 1
                self._cond.notify_all()

    async def _acquire(self, tenant: str) -> None:
        me = object()
        async with self._cond:
            self._queue.append(me)
            try:
                await self._cond.wait_for(
                    lambda: self._queue[0] is me and (self.owner in (None, tenant) or self.running == 0)
                )
                if self.owner not in (None, tenant):
                    await self._scrub()  # under the lock: nothing is admitted meanwhile
                    self.switches += 1
                self.owner = tenant
                self.running += 1
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
