"""Lockout bookkeeping with a fake clock: windows, expiry, isolation between keys, bounded memory,
separate thresholds for peers and verified subjects, listing and clearing (the Admin service's)."""

from __future__ import annotations

import dataclasses

from gateway.auth.lockout import Lockout, LockoutEntry, peer_key, subject_key
from gateway.config import LockoutConfig


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


def test_peers_and_subjects_have_their_own_thresholds() -> None:
    config = LockoutConfig(
        max_failures=2, window_seconds=10, lockout_seconds=30, max_auth_failures_per_peer=4
    )
    lock = Lockout(config, clock=Clock())
    assert [lock.failure(subject_key("acme/alice")) for _ in range(2)] == [False, True]
    assert [lock.failure(peer_key("10.0.0.7")) for _ in range(4)] == [False, False, False, True]
    peers_off = Lockout(dataclasses.replace(config, max_auth_failures_per_peer=0), clock=Clock())
    assert not any(peers_off.failure(peer_key("10.0.0.7")) for _ in range(100))
    assert peers_off.failure(subject_key("acme/bob")) is False and peers_off.failure(subject_key("acme/bob"))


def test_entries_list_locked_keys_first_then_recent_failures() -> None:
    clock = Clock()
    config = LockoutConfig(
        max_failures=2, window_seconds=10, lockout_seconds=30, max_auth_failures_per_peer=3
    )
    lock = Lockout(config, clock=clock)
    for _ in range(2):
        lock.failure(subject_key("acme/alice"))
    lock.failure(peer_key("10.0.0.7"))
    clock.now += 5
    assert lock.entries() == [
        LockoutEntry("subject:acme/alice", "subject", 25.0, 2),
        LockoutEntry("peer:10.0.0.7", "peer", 0.0, 1),
    ]
    clock.now += 30  # the lockout ended and the failure left the window: nothing to show
    assert lock.entries() == []


def test_clearing_forgets_lockouts_and_failures_of_the_matched_keys_only() -> None:
    lock = Lockout(LockoutConfig(max_failures=1, max_auth_failures_per_peer=5), clock=Clock())
    lock.failure(subject_key("acme/alice"))
    lock.failure(subject_key("acme/bob"))
    lock.failure(peer_key("10.0.0.7"))
    keys = lock.matching(lambda key: key == subject_key("acme/alice"))
    assert keys == ["subject:acme/alice"]
    lock.clear(keys)
    assert lock.retry_after(subject_key("acme/alice")) is None
    assert lock.retry_after(subject_key("acme/bob")) is not None
    assert [e.key for e in lock.entries()] == ["subject:acme/bob", "peer:10.0.0.7"]
    lock.clear(lock.matching(lambda _: True))
    assert lock.entries() == []
