"""Lockout bookkeeping with a fake clock: windows, expiry, isolation between keys, bounded memory."""

from __future__ import annotations

from gateway.config import LockoutConfig
from gateway.lockout import Lockout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_nth_failure_in_the_window_locks_out_until_expiry() -> None:
    clock = Clock()
    lock = Lockout(LockoutConfig(max_failures=3, window_seconds=10, lockout_seconds=30), clock=clock)
    assert [lock.failure("a") for _ in range(3)] == [False, False, True]
    assert lock.retry_after("a") == 30
    clock.now += 29
    assert lock.retry_after("a") == 1
    clock.now += 1
    assert lock.retry_after("a") is None


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    lock = Lockout(LockoutConfig(max_failures=3, window_seconds=10, lockout_seconds=30), clock=clock)
    for _ in range(5):
        assert not lock.failure("a")
        clock.now += 6  # never three within 10 s
    assert lock.retry_after("a") is None


def test_one_key_never_locks_out_another() -> None:
    lock = Lockout(LockoutConfig(max_failures=2, window_seconds=10, lockout_seconds=30), clock=Clock())
    lock.failure("a")
    assert lock.failure("a")
    assert lock.retry_after("a") is not None
    assert lock.retry_after("b") is None
    assert not lock.failure("b")


def test_zero_disables_lockout() -> None:
    lock = Lockout(LockoutConfig(max_failures=0), clock=Clock())
    assert not any(lock.failure("a") for _ in range(100))
    assert lock.retry_after("a") is None


def test_memory_is_bounded_by_forgetting_the_oldest_keys() -> None:
    lock = Lockout(
        LockoutConfig(max_failures=5, window_seconds=10, lockout_seconds=30), clock=Clock(), max_keys=100
    )
    for i in range(1000):
        lock.failure(f"k{i}")
    assert len(lock._failures) == 100
    assert "k999" in lock._failures and "k0" not in lock._failures
