"""Mixed load for the reliability tests: both tenants, unary and streaming, through the real SDK.

`Load` runs in the background of a test (closed loop: `concurrency` callers, each calling again as
soon as its call ends, optionally paced to a total rate) and keeps every outcome with its start
time, so a fault test can say "nothing failed before the fault" and "after it, only the clean
refusal the fault should cause".
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from airlock import AirlockError, AsyncClient
from tests.conftest import make_policy_dir
from tests.support import LiveStack

PROMPT = "the quick brown fox jumps over the lazy dog"


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when the call was made
    tenant: str
    kind: str  # "unary" or "stream"
    error: str  # "" for a correct answer, else "ErrorClass/REASON" (or the exception type)
    finished: float = 0.0  # time.monotonic() when the answer (or error) arrived


@dataclass
class Load:
    """Background callers over one client per tenant; see the module docstring."""

    live: LiveStack
    tenants: Sequence[str] = ("acme", "globex")
    model: str = "echo"
    concurrency: int = 8
    rate: float | None = None  # total calls/s across callers; None: as fast as they go
    stream_every: int = 3  # one call in this many is a stream
    timeout: float = 30.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _clients: dict[str, AsyncClient] = field(default_factory=dict)

    async def __aenter__(self) -> Load:
        self._clients = {t: self.live.client(t) for t in self.tenants}
        counter = itertools.count()
        start = time.monotonic()
        for i in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._caller(i, counter, start)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def _caller(self, index: int, counter: itertools.count[int], start: float) -> None:
        while not self._stop.is_set():
            n = next(counter)
            if self.rate:  # open-loop pacing: call n is due at start + n / rate
                delay = start + n / self.rate - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                        return
                    except TimeoutError:
                        pass
            tenant = self.tenants[n % len(self.tenants)]
            kind = "stream" if n % self.stream_every == 0 else "unary"
            outcome = dataclasses.replace(await self._call(tenant, kind), finished=time.monotonic())
            self.outcomes.append(outcome)
            if outcome.error:  # back off a little, as a real client would, instead of spinning
                await asyncio.sleep(0.05)

    async def _call(self, tenant: str, kind: str) -> Outcome:
        started = time.monotonic()
        client = self._clients[tenant]
        try:
            if kind == "unary":
                answer = await client.generate(PROMPT, model=self.model, timeout=self.timeout)
                text = answer.text
            else:
                chunks = [c async for c in client.stream(PROMPT, model=self.model, timeout=self.timeout)]
                text = "".join(c.text for c in chunks)
                if chunks[-1].finish_reason is None:
                    return Outcome(started, tenant, kind, "stream ended without a finish reason")
        except AirlockError as exc:
            return Outcome(started, tenant, kind, f"{type(exc).__name__}/{exc.reason}")
        except Exception as exc:  # anything else is a finding in itself: keep it, don't hide it
            return Outcome(started, tenant, kind, f"{type(exc).__name__}: {exc}")
        return Outcome(started, tenant, kind, "" if text == PROMPT else "wrong answer")

    def ok(self, since: float = 0.0, until: float = float("inf")) -> list[Outcome]:
        return [o for o in self.outcomes if since <= o.started < until and not o.error]

    def errors(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(o.error for o in self.outcomes if since <= o.started < until and o.error)

    def by_tenant(self, since: float = 0.0) -> Counter[str]:
        return Counter(o.tenant for o in self.ok(since))


async def measure_capacity(live: LiveStack, seconds: float, concurrency: int = 16) -> float:
    """Calls/s the stack sustains with `concurrency` callers and no pacing (mixed load)."""
    async with Load(live, concurrency=concurrency) as warm:  # connections, caches, first calls
        await asyncio.sleep(1.0)
    assert not warm.errors(), warm.errors()
    async with Load(live, concurrency=concurrency) as load:
        await asyncio.sleep(seconds)
    assert not load.errors(), load.errors()
    return len(load.outcomes) / seconds


def without_quotas(policy: Path) -> Path:
    """The repository's policy in `policy` (see tests/conftest.py) with no quotas: the load here
    measures the stack, and a fast machine must not run into the demo tenants' request rates."""
    make_policy_dir(policy)
    (policy / "tenants.toml").write_text(
        "".join(f'[tenants.{t}]\nissuers = ["airlock-dev"]\n' for t in ("acme", "globex"))
    )
    return policy


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (the kernel's own count, no sampling profiler)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def wait_until(condition: Callable[[], object], limit: float, what: str) -> None:
    """Poll `condition()` (sync, or async returning a coroutine) every 50 ms for up to `limit` s."""
    end = time.monotonic() + limit
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached in {limit:.0f} s")
        await asyncio.sleep(0.05)
