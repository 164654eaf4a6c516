"""Authorization on the request path: the policy in service, a decision cache, and hot reload.

`Authorizer.decide` never waits: it reads the current generation (one attribute) and its cache.
A reload loads, validates and runs the policy's test cases in a worker thread, then swaps the
generation in one assignment; a policy that fails any step is refused and the old one keeps
serving. Every reload outcome is logged, counted and audited; whatever the files make the loader
raise is a rejection, and the watcher outlives any failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit import AuditLog
from gateway.metrics import Metrics
from gateway.policy.lint import lint_errors, reload_warnings
from gateway.policy.rules import Decision, Policy, PolicyError, load_policy
from gateway.watching import watch_directory

__all__ = ["Authorizer", "Reload", "load_checked"]

_log = logging.getLogger("airlock.authz")
_REASON_CHARS = 2000  # of a rejection's reason, in the log and the audit record
LINT_AT_RELOAD_LINES = 10_000  # lint warnings are looked for (and logged) in policies up to this size


@dataclass(frozen=True)
class Reload:
    """The outcome of the last reload (the admin socket's Status reports it)."""

    result: str  # "accepted" or "rejected"
    at: float  # unix time
    reason: str  # why it was rejected; "" when accepted


@dataclass(frozen=True)
class _Generation:
    number: int
    policy: Policy
    cache: dict[tuple[str, str, str, str], Decision]


def load_checked(directory: Path, required_tenants: Iterable[str] = ()) -> Policy:
    """Load a policy directory and refuse it unless it covers `required_tenants`, has no lint
    errors (e.g. a tenant pattern that reaches other tenants) and its cases pass."""
    policy = load_policy(directory)
    errors = lint_errors(policy)
    if errors:
        raise PolicyError(f"{len(errors)} lint error(s); first: {errors[0]}")
    missing = sorted(set(required_tenants) - set(policy.tenants))
    if missing:
        raise PolicyError(f"{directory / 'tenants.toml'}: served tenants missing: {', '.join(missing)}")
    failing = policy.failing_cases()
    if failing:
        case, decision = failing[0]
        got = "allow" if decision.allowed else "deny"
        raise PolicyError(
            f"{directory / 'tests.yaml'}: {len(failing)} case(s) fail; case {case.index} "
            f"({case.subject} {case.action} {case.resource} in {case.tenant}) "
            f"expects {case.expect}, got {got}"
        )
    return policy


def _settle() -> None:
    """Move what is alive now (a policy generation: ~100k objects) out of the cycle collector's
    reach. Otherwise every full collection walks them and stalls the event loop for ~200 ms.
    Nothing in a generation forms reference cycles, so a retired one is still freed by refcount.
    (No gc.collect() first: a full collection here would be the very stall this avoids.)"""
    gc.freeze()


def _load_quietly(directory: Path, required_tenants: Iterable[str]) -> Policy:
    """`load_checked` without the cycle collector: building 100k lines would otherwise trigger
    collections that stop every thread, the event loop's included. The result is frozen before
    collections resume, so they never walk it."""
    gc.disable()
    try:
        policy = load_checked(directory, required_tenants)
        gc.freeze()
        return policy
    finally:
        gc.enable()


def _free_gradually(retired: list[_Generation]) -> None:
    """Free a retired generation a few objects at a time. Dropped at once, its ~300k objects are
    freed inside one C call that holds the GIL for ~30 ms, whichever thread makes it; popped one by
    one, the event loop gets the GIL in between (`_loop_first`). A policy somebody still holds (a
    call that read it before the swap) is only let go, never emptied under them."""
    generation = retired.pop()
    policy = generation.policy
    _drain(generation.cache)  # out of service: no decision reads it any more
    del generation
    if sys.getrefcount(policy) == 2:  # `policy` and getrefcount's argument: nobody else holds it
        for part in policy.take_apart():
            _drain(part)


def _drain(container: dict[Any, Any] | list[Any]) -> None:
    if isinstance(container, dict):
        while container:
            container.popitem()
    else:
        while container:
            container.pop()


@contextlib.contextmanager
def _loop_first() -> Iterator[None]:
    """While a thread does a long pure-Python job, hand the GIL back every 0.1 ms instead of 5 ms:
    each call the event loop serves waits for the GIL several times (after every poll), and at
    5 ms a wait a 100k-line reload multiplied request latency by ten."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, 0.0001))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _background() -> None:
    """Policy loads run niced (Linux nices threads one by one): on a busy host they take a little
    longer, and the calls being served meanwhile keep the CPU."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


_LOADER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy-load", initializer=_background)


class Authorizer:
    def __init__(
        self,
        policy: Policy,
        *,
        required_tenants: Iterable[str] = (),
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
        cache_size: int = 100_000,
    ) -> None:
        self.required_tenants = tuple(required_tenants)
        self.metrics = metrics or Metrics()
        self.audit = audit or AuditLog(None)
        self.cache_size = cache_size
        self._current = _Generation(1, policy, {})
        self._reload_lock = asyncio.Lock()
        self.last_reload: Reload | None = None
        self.lint_warnings = 0  # of the policy in service (counted when it came into service)
        self.metrics.policy_generation.set(1)
        _settle()

    @classmethod
    def from_directory(
        cls,
        directory: Path,
        *,
        required_tenants: Iterable[str] = (),
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ) -> Authorizer:
        tenants = tuple(required_tenants)
        policy = load_checked(directory, tenants)
        authorizer = cls(policy, required_tenants=tenants, metrics=metrics, audit=audit)
        if len(policy.rules) + len(policy.links) <= LINT_AT_RELOAD_LINES:
            found = reload_warnings(policy)
            for finding in found:
                _log.warning("policy lint: %s", finding)
            authorizer.lint_warnings = len(found)
        return authorizer

    @property
    def generation(self) -> int:
        return self._current.number

    @property
    def policy(self) -> Policy:
        return self._current.policy

    def decide(self, subject: str, tenant: str, resource: str, action: str) -> Decision:
        current = self._current  # one read: a concurrent swap can't mix two generations
        key = (subject, tenant, resource, action)
        decision = current.cache.get(key)
        if decision is None:
            decision = current.policy.decide(subject, tenant, resource, action)
            if len(current.cache) >= self.cache_size:
                current.cache.clear()
            current.cache[key] = decision
        return decision

    def swap(self, policy: Policy) -> int:
        number = self._current.number + 1
        self._current = _Generation(number, policy, {})
        self.metrics.policy_generation.set(number)
        _settle()
        return number

    async def reload(self) -> bool:
        """Load the policy directory again; put it in service only if it is valid. True if swapped."""
        async with self._reload_lock:
            directory = self._current.policy.directory
            loop = asyncio.get_running_loop()
            try:
                with _loop_first():
                    load = functools.partial(_load_quietly, directory, self.required_tenants)
                    policy = await loop.run_in_executor(_LOADER, load)
            except Exception as exc:  # whatever a file makes the loader raise is a rejection, never a crash
                self._rejected(exc)
                return False
            retired = [self._current]
            number = self.swap(policy)
            # Freeing 100k lines and a full cache takes tens of ms: a thread does it a piece at a time.
            with _loop_first():
                await loop.run_in_executor(_LOADER, _free_gradually, retired)
            self.metrics.policy_reloads.labels("accepted").inc()
            self.last_reload = Reload("accepted", time.time(), "")
            warnings = await self._lint(policy, loop)
            self.audit.record("policy_reload", result="accepted", generation=number,
                              rules=len(policy.rules), links=len(policy.links),
                              lint_warnings=warnings)  # fmt: skip
            _log.info("policy generation %d in service (%d rules, %d role links)",
                      number, len(policy.rules), len(policy.links))  # fmt: skip
            return True

    async def _lint(self, policy: Policy, loop: asyncio.AbstractEventLoop) -> int | None:
        """Log the lint warnings of a policy just put in service; their number (None: too large to
        lint here, `airlock policy lint` does it offline)."""
        if len(policy.rules) + len(policy.links) > LINT_AT_RELOAD_LINES:
            return None
        try:
            with _loop_first():
                found = await loop.run_in_executor(_LOADER, reload_warnings, policy)
        except Exception as exc:  # a lint bug never takes a good policy out of service
            _log.error("policy lint failed", exc_info=exc)
            return None
        for finding in found:
            _log.warning("policy lint: %s", finding)
        self.lint_warnings = len(found)
        return len(found)

    def _rejected(self, exc: Exception) -> None:
        if isinstance(exc, PolicyError):
            reason = str(exc)
        else:  # a loader bug, not the file's: the traceback goes to the log, its type to the record
            reason = f"the policy could not be loaded ({type(exc).__name__}: {str(exc)[:200]})"
            _log.error("policy reload failed unexpectedly", exc_info=exc)
        reason = reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS] + "..."
        self.metrics.policy_reloads.labels("rejected").inc()
        self.last_reload = Reload("rejected", time.time(), reason)
        _log.error("policy reload rejected; generation %d keeps serving: %s", self.generation, reason)
        self.audit.record("policy_reload", result="rejected", generation=self.generation, reason=reason)

    async def watch(self, stop: asyncio.Event, *, debounce_ms: int = 300, check_ms: int = 1000) -> None:
        """Reload whenever a file in the policy directory changes, until `stop` is set; survives
        anything (`gateway.watching`), so a later edit, a revocation say, always takes effect."""

        async def changed(_paths: set[Path] | None) -> None:
            await self.reload()

        await watch_directory(
            self._current.policy.directory, changed, stop, name="policy",
            on_error=self.metrics.watch_errors.labels("policy").inc,
            debounce_ms=debounce_ms, check_ms=check_ms,
        )  # fmt: skip
