"""Temporary lockout after repeated failures: too many refusals for one key within a window.

Keys name one identity (a verified subject, or a peer plus the identity it claimed), so a lockout
never spills onto anyone else. Memory stays bounded: the oldest keys are forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from gateway.config import LockoutConfig

__all__ = ["Lockout"]


class Lockout:
    def __init__(
        self, config: LockoutConfig, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.config = config
        self.clock = clock
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._until: dict[str, float] = {}

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may try again, or None when it is not locked out."""
        until = self._until.get(key)
        if until is None:
            return None
        left = until - self.clock()
        if left <= 0:
            del self._until[key]
            return None
        return left

    def failure(self, key: str) -> bool:
        """Count a failure for `key`; True when it starts a lockout."""
        if self.config.max_failures <= 0:
            return False
        now = self.clock()
        times = self._failures.pop(key, None) or deque()
        self._failures[key] = times  # most recently failed last
        times.append(now)
        while times and times[0] <= now - self.config.window_seconds:
            times.popleft()
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        if len(times) < self.config.max_failures:
            return False
        times.clear()
        self._until[key] = now + self.config.lockout_seconds
        if len(self._until) > self.max_keys:
            for stale in [k for k, t in self._until.items() if t <= now]:
                del self._until[stale]
        return True
