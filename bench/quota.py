"""Cost of quota admission: one acquire + release, in memory and through a real redis-server.

Each store admits and releases `--calls` calls (all three limits set, none reached), sequentially
(latency per admission + release) and with `--concurrency` calls in flight (throughput). Redis is
started on a free loopback port for the run (needs `redis-server`, installed by make venv).
Prints a table and writes bench/results/quota.json. Shared, noisy machines: compare within a run.

    python bench/quota.py [--quick] [--calls 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RESULTS, write_report  # noqa: E402

from gateway.quota import MemoryQuotaStore, QuotaLimits, QuotaStore, RedisQuotaStore  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

LIMITS = QuotaLimits(requests_per_second=1e9, burst=10**9, tokens_per_minute=10**11, concurrent_streams=10**6)


async def one(store: QuotaStore, tenant: str) -> float:
    lease = uuid.uuid4().hex
    start = time.perf_counter()
    await store.acquire(tenant, LIMITS, 256, lease)
    await store.release(tenant, LIMITS, lease, 200)
    return time.perf_counter() - start


async def measure(store: QuotaStore, calls: int, concurrency: int) -> dict[str, float]:
    for _ in range(50):  # warm up (script loading, connections)
        await one(store, "warm")
    latencies = sorted([await one(store, "acme") for _ in range(calls)])
    sem = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> None:
        async with sem:
            await one(store, f"t{i % 10}")

    start = time.perf_counter()
    await asyncio.gather(*(limited(i) for i in range(calls)))
    elapsed = time.perf_counter() - start
    return {
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
        "concurrent_per_s": calls / elapsed,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200 calls (smoke test)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "quota.json")
    args = parser.parse_args()
    if args.quick:
        args.calls = 200
    results = {"memory": await measure(MemoryQuotaStore(), args.calls, args.concurrency)}
    if RedisServer.binary() is not None:
        with tempfile.TemporaryDirectory() as tmp:
            server = RedisServer(Path(tmp))
            server.start()
            store = RedisQuotaStore(server.url, key_prefix=f"bench:{uuid.uuid4().hex}")
            try:
                results["redis"] = await measure(store, args.calls, args.concurrency)
            finally:
                await store.close()
                server.stop()
    print(f"{'store':<8} {'p50 µs':>10} {'p99 µs':>10} {'calls/s @' + str(args.concurrency):>14}")
    for name, r in results.items():
        print(f"{name:<8} {r['p50_us']:>10.1f} {r['p99_us']:>10.1f} {r['concurrent_per_s']:>14.0f}")
    # No row of the table: figures only, listed under the table by bench/report.py.
    details = {"calls": args.calls, "concurrency": args.concurrency, **results}
    write_report(args.out, "quota", [], details, quick=args.quick)


if __name__ == "__main__":
    asyncio.run(main())
