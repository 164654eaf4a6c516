"""Authorization cost at scale: load, decide (first-time and repeated keys), and hot reload.

A synthetic policy directory (10,000 tenants, about 100,000 `p` and `g` lines, three role levels,
some denies, role rules for every tenant under `*`) is loaded with `load_checked`. Then:
`Authorizer.decide` timed call by call, on keys it has never seen and on repeated keys; and a
reload of the whole directory while the event loop keeps deciding, with a 1 ms ticker measuring
how late the loop runs, against the same load without a reload (the deciding task pauses
`--pause-ms` between batches; at 0 it saturates the loop, which starves the reload's worker thread
of the GIL and stretches the reload many times over). Also timed: the longest garbage collection
and the swap, which drops the old generation on the loop. Casbin's own enforcer answers one request
at the same size, as a reference. Prints a table beside the targets and writes
bench/results/authz.json. The machines are shared and noisy: compare figures within one run.

    python bench/authz.py [--quick] [--tenants 10000] [--samples 20000] [--pause-ms 0.2] [--no-casbin]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RESULTS, Row, print_rows, write_report  # noqa: E402

from gateway.policy.authz import Authorizer, load_checked  # noqa: E402
from gateway.policy.rules import load_policy  # noqa: E402

Request = tuple[str, str, str, str]

TARGETS = {"cached_p99_us": 20.0, "uncached_p99_us": 300.0, "reload_p99_ratio": 2.0}
ROLE_RULES = [
    "p, tenant-admin, *, *, *, allow",
    "p, user, *, model:*, generate, allow",
    "p, user, *, model:*, stream, allow",
    "p, user, *, models, list, allow",
    "p, service, *, model:*, generate, allow",
    "p, service, *, models, list, allow",
]
RESOURCES = ["model:m0", "model:m1", "model:m2", "model:beta-x", "model:restricted-1", "models",
             "admin:usage", "admin:policy"]  # fmt: skip
ACTIONS = ["generate", "stream", "list", "admin"]
CASES = """\
- {subject: t00000/u0, tenant: t00000, resource: admin:policy, action: admin, expect: allow}
- {subject: t00000/u0, tenant: t00001, resource: model:m0, action: generate, expect: deny}
- {subject: nobody, tenant: t00000, resource: model:m0, action: generate, expect: deny}
"""


@dataclass(frozen=True)
class Stats:
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float
    n: int

    @classmethod
    def of(cls, samples_ns: list[int]) -> Stats:
        s = sorted(samples_ns)
        p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
        return cls(statistics.median(s) / 1000, p99 / 1000, s[-1] / 1000, statistics.fmean(s) / 1000, len(s))


@dataclass(frozen=True)
class Phase:
    """What the event loop saw while some work ran: decide latency and how late a 1 ms tick came."""

    seconds: float
    decide: Stats
    loop_lag: Stats
    gc_max_ms: float  # the longest garbage collection (any thread: it holds the GIL)

    @property
    def decides_per_s(self) -> float:
        return self.decide.n / self.seconds


def write_policy(directory: Path, tenants: int, rng: random.Random) -> tuple[int, list[list[str]]]:
    """Write the synthetic policy; return its line count and each tenant's subjects."""
    lines = ["# synthetic policy for bench/authz.py", *ROLE_RULES]
    subjects: list[list[str]] = []
    toml = []
    for i in range(tenants):
        t = f"t{i:05d}"
        toml.append(f'[tenants.{t}]\nissuers = ["issuer-{i % 7}"]\n')
        # Three role levels above the subject: tenant-admin > lead > user.
        lines += [f"g, tenant-admin, lead, {t}", f"g, lead, user, {t}"]
        users = [f"{t}/u{k}" for k in range(rng.randint(3, 7))]
        lines.append(f"g, {users[0]}, tenant-admin, {t}")
        for user in users[1:]:
            lines.append(f"g, {user}, {rng.choice(['user', 'user', 'lead', 'analyst'])}, {t}")
        service = f"spiffe://airlock.local/tenant/{t}/svc/batch"
        lines.append(f"g, {service}, service, {t}")
        users.append(service)
        lines.append(f"p, lead, {t}, admin:usage, admin, allow")
        lines.append(f"p, analyst, {t}, model:m{rng.randrange(3)}, *, allow")
        if rng.random() < 0.5:
            lines.append(f"p, {rng.choice(users)}, {t}, model:restricted-*, *, deny")
        if rng.random() < 0.3:
            lines.append(f"p, user, {t}, model:beta-*, generate, deny")
        subjects.append(users)
    (directory / "policy.csv").write_text("\n".join(lines) + "\n")
    (directory / "tenants.toml").write_text("\n".join(toml))
    (directory / "tests.yaml").write_text(CASES)
    (directory / "model.conf").write_text((ROOT / "policy" / "model.conf").read_text())
    return len(lines) - 1, subjects


def request_maker(rng: random.Random, subjects: list[list[str]]) -> Callable[[], Request]:
    """Random requests: mostly a tenant's own subjects, some strangers and unknown tenants."""

    def make() -> Request:
        i = rng.randrange(len(subjects))
        tenant = f"t{i:05d}"
        roll = rng.random()
        if roll < 0.8:
            subject = rng.choice(subjects[i])
        elif roll < 0.9:
            subject = rng.choice(subjects[rng.randrange(len(subjects))])
        else:
            subject = f"{tenant}/stranger{rng.randrange(1000)}"
        if rng.random() < 0.05:
            tenant = f"x{i}"
        resource = rng.choice(RESOURCES) if rng.random() < 0.8 else f"model:m{rng.randrange(10_000)}"
        return subject, tenant, resource, rng.choice(ACTIONS)

    return make


def distinct(make: Callable[[], Request], n: int, exclude: set[Request]) -> list[Request]:
    out: dict[Request, None] = {}
    while len(out) < n:
        request = make()
        if request not in exclude:
            out[request] = None
    return list(out)


def time_decides(authorizer: Authorizer, requests: list[Request]) -> list[int]:
    clock = time.perf_counter_ns
    decide = authorizer.decide
    samples = []
    for request in requests:
        start = clock()
        decide(*request)
        samples.append(clock() - start)
    return samples


async def under_load(authorizer: Authorizer, make: Callable[[], Request], work: Awaitable[object],
                     pause_s: float) -> Phase:  # fmt: skip
    """Decide in batches of 50, `pause_s` apart, and tick every 1 ms while `work` runs."""
    stop = asyncio.Event()
    lags_ns: list[int] = []
    decides_ns: list[int] = []

    async def ticker() -> None:
        while not stop.is_set():
            start = time.perf_counter_ns()
            await asyncio.sleep(0.001)
            lags_ns.append(max(0, time.perf_counter_ns() - start - 1_000_000))

    async def decider() -> None:
        clock = time.perf_counter_ns
        decide = authorizer.decide
        while not stop.is_set():
            for request in [make() for _ in range(50)]:  # made outside the timed calls
                start = clock()
                decide(*request)
                decides_ns.append(clock() - start)
            await asyncio.sleep(pause_s)

    gc_ns: list[int] = [0]
    gc_start = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter_ns()
        else:
            gc_ns.append(time.perf_counter_ns() - gc_start[0])

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(decider())]
    await asyncio.sleep(0.05)
    gc.callbacks.append(on_gc)
    start = time.perf_counter()
    try:
        await work
    finally:
        elapsed = time.perf_counter() - start
        gc.callbacks.remove(on_gc)
    stop.set()
    await asyncio.gather(*tasks)
    return Phase(elapsed, Stats.of(decides_ns), Stats.of(lags_ns), max(gc_ns) / 1e6)


async def reload_phases(authorizer: Authorizer, make: Callable[[], Request], baseline_s: float,
                        pause_s: float) -> tuple[Phase, Phase]:  # fmt: skip
    """The same load twice: for `baseline_s` without a reload, then for as long as a reload takes."""
    generation = authorizer.generation
    without = await under_load(authorizer, make, asyncio.sleep(baseline_s), pause_s)
    swapped: list[bool] = []

    async def reload() -> None:
        swapped.append(await authorizer.reload())

    during = await under_load(authorizer, make, reload(), pause_s)
    if swapped != [True] or authorizer.generation != generation + 1:
        raise SystemExit(f"reload did not swap: {swapped}, generation {authorizer.generation}")
    return without, during


def casbin_reference(directory: Path, request: Request) -> dict[str, float]:
    policy = load_policy(directory)
    start = time.perf_counter()
    enforcer = policy.casbin_enforcer()
    built = time.perf_counter() - start
    times = []
    for _ in range(2):  # the first request in a tenant also builds Casbin's role manager for it
        start = time.perf_counter()
        allowed = enforcer.enforce(*request)
        times.append(time.perf_counter() - start)
        if allowed != policy.decide(*request).allowed:
            raise SystemExit(f"Casbin and decide disagree on {request}")
    return {"build_s": built, "first_enforce_ms": times[0] * 1000, "enforce_ms": times[1] * 1000}


def pair(a: float, b: float, digits: int = 1) -> str:
    return f"{a:.{digits}f} / {b:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 tenants and fewer samples")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=20_000, help="timed decide calls per row")
    parser.add_argument(
        "--pause-ms", type=float, default=0.2, help="pause between batches of 50 decides ; 0 saturates"
    )
    parser.add_argument("--no-casbin", action="store_true", help="skip the Casbin reference rows")
    parser.add_argument("--out", type=Path, default=RESULTS / "authz.json")
    args = parser.parse_args()
    if args.quick:
        args.tenants, args.samples = min(args.tenants, 1_000), min(args.samples, 5_000)
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="airlock-bench-authz-") as tmp:
        directory = Path(tmp)
        lines, subjects = write_policy(directory, args.tenants, rng)
        print(f"policy: {args.tenants} tenants, {lines} lines; loading…", file=sys.stderr)
        start = time.perf_counter()
        load_policy(directory)
        parse_s = time.perf_counter() - start
        start = time.perf_counter()
        authorizer = Authorizer(load_checked(directory), cache_size=10 * args.samples + 100_000)
        load_s = time.perf_counter() - start
        policy = authorizer.policy
        sizes = {"tenants": len(policy.tenants), "rules": len(policy.rules), "links": len(policy.links)}
        del policy  # the authorizer holds the only reference, as in the gateway

        make = request_maker(rng, subjects)
        print(f"decide: {args.samples} first-time keys, then {2 * args.samples} repeated…", file=sys.stderr)
        warm = distinct(make, 2_000, set())
        time_decides(authorizer, warm)
        fresh = distinct(make, args.samples, set(warm))
        uncached = Stats.of(time_decides(authorizer, fresh))
        hot = fresh[:1000]
        cached = Stats.of(time_decides(authorizer, [rng.choice(hot) for _ in range(args.samples * 2)]))

        print("the same load without a reload, then during one…", file=sys.stderr)
        without, during = asyncio.run(
            reload_phases(authorizer, make, baseline_s=max(1.0, load_s), pause_s=args.pause_ms / 1000)
        )
        # What a bare swap() costs its caller when it drops the old generation (its policy and its
        # cache, filled here the way traffic fills it) right there; reload() hands that to a thread.
        time_decides(authorizer, distinct(make, min(args.samples * 5, 100_000), set()))
        replacement = load_checked(directory)
        start = time.perf_counter()
        authorizer.swap(replacement)
        swap_ms = (time.perf_counter() - start) * 1000
        del replacement
        casbin = None
        if not args.no_casbin:
            print("Casbin reference (build the enforcer, one decision)…", file=sys.stderr)
            gc.collect()
            request = (subjects[-1][0], f"t{args.tenants - 1:05d}", "model:m9", "generate")
            casbin = casbin_reference(directory, request)

    ratio = during.decide.p99_us / without.decide.p99_us
    rows: list[tuple[str, str, str]] = [
        (f"load_policy, {lines} lines (s)", f"{parse_s:.2f}", ""),
        (f"load_checked, {lines} lines (s)", f"{load_s:.2f}", ""),
        ("decide uncached p50 / p99 (µs)", pair(uncached.p50_us, uncached.p99_us),
         f"p99 ≤ {TARGETS['uncached_p99_us']:.0f}"),
        ("decide cached p50 / p99 (µs)", pair(cached.p50_us, cached.p99_us, 2),
         f"p99 ≤ {TARGETS['cached_p99_us']:.0f}"),
        ("reload wall time, under load (s)", f"{during.seconds:.2f}", ""),
        ("decide p99 no reload / reload (µs)", pair(without.decide.p99_us, during.decide.p99_us), ""),
        ("decide p99 ratio reload / no reload", f"{ratio:.2f}", f"≤ {TARGETS['reload_p99_ratio']:.0f}"),
        ("decide max no reload / reload (ms)",
         pair(without.decide.max_us / 1000, during.decide.max_us / 1000, 2), ""),
        ("loop lag p99 no reload / reload (ms)",
         pair(without.loop_lag.p99_us / 1000, during.loop_lag.p99_us / 1000, 2), ""),
        ("loop lag max no reload / reload (ms)",
         pair(without.loop_lag.max_us / 1000, during.loop_lag.max_us / 1000, 2), ""),
        ("decides/s no reload / reload", pair(without.decides_per_s, during.decides_per_s, 0), ""),
        ("longest GC pause no reload / reload (ms)", pair(without.gc_max_ms, during.gc_max_ms), ""),
        ("bare swap(), old generation freed by the caller (ms)", f"{swap_ms:.1f}", ""),
    ]  # fmt: skip
    if casbin is not None:
        rows += [
            ("Casbin: build enforcer (s), reference", f"{casbin['build_s']:.2f}", ""),
            (
                "Casbin: enforce first / again (ms), reference",
                pair(casbin["first_enforce_ms"], casbin["enforce_ms"]),
                "",
            ),
        ]
    verdicts = {
        "cached_p99": cached.p99_us <= TARGETS["cached_p99_us"],
        "uncached_p99": uncached.p99_us <= TARGETS["uncached_p99_us"],
        "reload_p99_ratio": ratio <= TARGETS["reload_p99_ratio"],
    }
    print(f"\n{'metric':<50} {'result':>18}  {'target':<10}")
    for label, value, target in rows:
        print(f"{label:<50} {value:>18}  {target:<10}")
    print("targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in verdicts.items()))
    results = {
        "policy": {**sizes, "lines": lines},
        "load_policy_s": parse_s,
        "load_checked_s": load_s,
        "decide_uncached": asdict(uncached),
        "decide_cached": asdict(cached),
        "without_reload": {**asdict(without), "decides_per_s": without.decides_per_s},
        "during_reload": {**asdict(during), "decides_per_s": during.decides_per_s},
        "reload_p99_ratio": ratio,
        "swap_ms": swap_ms,
        "decider_pause_ms": args.pause_ms,
        "casbin_reference": casbin,
        "targets": TARGETS,
        "targets_met": verdicts,
    }
    scale = f"{sizes['tenants']} tenants / {lines} lines"
    table = [
        Row("6a", f"authz decision, cached, {scale}: p99", "—", cached.p99_us, "µs", None,
            f"p99 ≤ {TARGETS['cached_p99_us']:.0f} µs", TARGETS["cached_p99_us"], "<="),
        Row("6b", f"authz decision, uncached, {scale}: p99", "—", uncached.p99_us, "µs", None,
            f"p99 ≤ {TARGETS['uncached_p99_us'] / 1000:.1f} ms", TARGETS["uncached_p99_us"], "<="),
    ]  # fmt: skip
    print_rows(table)
    write_report(args.out, "authz", table, results, quick=args.quick)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
