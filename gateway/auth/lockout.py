"""Temporary lockout after repeated failures: too many refusals for one key within a window.

Two kinds of key, each with its own threshold:
- `subject:NAME`, a *verified* identity (its policy subject), counts that identity's own policy
  denials (`lockout.max_failures`). Nothing unverified is ever counted against an identity: a token
  whose signature did not verify names nobody.
- `peer:ADDRESS` counts failed authentications from one network address
  (`lockout.max_auth_failures_per_peer`). Behind NAT or a load balancer many callers share an
  address, so a locked peer only changes the answer to calls that fail anyway (gateway/auth/guard.py).

Memory stays bounded: the oldest keys are forgotten first. Operators list and clear lockouts through
the gateway's Admin socket (`airlock lockout list|clear`, gateway/admin.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import LockoutConfig

__all__ = ["Lockout", "LockoutEntry", "peer_key", "subject_key"]


def peer_key(address: str) -> str:
    return f"peer:{address}"


def subject_key(subject: str) -> str:
    return f"subject:{subject}"


@dataclass(frozen=True)
class LockoutEntry:
    """One key with recent failures or a lockout in force."""

    key: str
    kind: str  # "peer" or "subject"
    seconds_left: float  # 0 when not locked out (yet)
    failures: int  # failures counted in the current window; for a locked key, those that locked it


class Lockout:
    def __init__(
        self, config: LockoutConfig, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.config = config
        self.clock = clock
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._until: dict[str, tuple[float, int]] = {}  # key -> (locked until, failures that locked it)

    def limit(self, key: str) -> int:
        """Failures within the window that lock `key` out; 0: never."""
        if key.startswith("peer:"):
            return self.config.max_auth_failures_per_peer
        return self.config.max_failures

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may try again, or None when it is not locked out."""
        locked = self._until.get(key)
        if locked is None:
            return None
        left = locked[0] - self.clock()
        if left <= 0:
            del self._until[key]
            return None
        return left

    def failure(self, key: str) -> bool:
        """Count a failure for `key`; True when it starts a lockout."""
        limit = self.limit(key)
        if limit <= 0:
            return False
        now = self.clock()
        times = self._failures.pop(key, None) or deque()
        self._failures[key] = times  # most recently failed last
        times.append(now)
        self._expire(times, now)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        if len(times) < limit:
            return False
        count = len(times)
        del self._failures[key]
        self._until[key] = (now + self.config.lockout_seconds, count)
        if len(self._until) > self.max_keys:
            for stale in [k for k, (t, _) in self._until.items() if t <= now]:
                del self._until[stale]
        return True

    def entries(self) -> list[LockoutEntry]:
        """Every key locked out now or with failures in the current window, locked ones first."""
        now = self.clock()
        out = []
        for key, (until, count) in list(self._until.items()):
            if until > now:
                out.append(LockoutEntry(key, _kind(key), until - now, count))
            else:
                del self._until[key]
        for key, times in list(self._failures.items()):
            self._expire(times, now)
            if not times:
                del self._failures[key]
            elif key not in self._until:
                out.append(LockoutEntry(key, _kind(key), 0.0, len(times)))
        out.sort(key=lambda e: (-e.seconds_left, e.key))
        return out

    def matching(self, match: Callable[[str], bool]) -> list[str]:
        """The keys with a lockout or failures that `match` accepts."""
        return sorted({k for k in (*self._until, *self._failures) if match(k)})

    def clear(self, keys: list[str]) -> None:
        """Forget the lockouts and failures of `keys`."""
        for key in keys:
            self._until.pop(key, None)
            self._failures.pop(key, None)

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.config.window_seconds:
            times.popleft()


def _kind(key: str) -> str:
    return key.partition(":")[0]
