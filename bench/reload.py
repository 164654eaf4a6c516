"""Policy hot reload under load (row 7 of docs/benchmarks.md): a running stack (gateway + EchoEngine
worker) serving a policy of 10,000 tenants / ~100,000 lines, under steady unary load, while the
policy file is rewritten so the gateway reloads it, several times.

The load never stops; the run alternates windows: a reload window (the policy rewritten, atomically
as an operator would, until the gateway's `airlock_policy_generation` gauge shows the new
generation, plus a short settle while the old one is freed) and a baseline window of the same
length with no reload. Each request counts in the window it started in. Targets: no failed request
in the whole run, and the reload windows' p99 latency <= 2x the baseline windows' p99.
Writes bench/results/reload.json.

    python bench/reload.py [--quick] [--tenants 10000] [--reloads 4] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from authz import write_policy  # noqa: E402
from common import RESULTS, Row, print_rows, summary, write_report  # noqa: E402
from overhead import prompt  # noqa: E402

from airlock.v1 import inference_pb2 as pb  # noqa: E402
from airlock.v1 import inference_pb2_grpc  # noqa: E402
from control.launcher import Stack  # noqa: E402
from control.tokens import mint_dev_token  # noqa: E402
from gateway import config as config_mod  # noqa: E402

CONFIG = """
[gateway]
max_tokens = 1024
metrics_listen = "127.0.0.1:0"

[models.echo]
engine = "echo"

[tenants.bench]
models = ["echo"]
"""
GENERATION = re.compile(r"^airlock_policy_generation\s+([0-9.e+]+)$", re.M)
REJECTED = re.compile(r'^airlock_policy_reloads_total\{result="rejected"\}\s+([0-9.e+]+)$', re.M)


@dataclass
class Samples:
    """(start time, latency ms, ok) of every request the load made."""

    items: list[tuple[float, float, bool]] = field(default_factory=list)

    def within(self, windows: list[tuple[float, float]]) -> list[tuple[float, float, bool]]:
        return [s for s in self.items if any(a <= s[0] < b for a, b in windows)]


def policy_dir(directory: Path, tenants: int) -> tuple[int, str]:
    """The synthetic 100k-line policy (bench/authz.py's) plus the `bench` tenant the load calls as."""
    directory.mkdir(parents=True)
    lines, _subjects = write_policy(directory, tenants, random.Random(1))
    with (directory / "tenants.toml").open("a") as fh:
        fh.write('\n[tenants.bench]\nissuers = ["airlock-dev"]\n')
    with (directory / "policy.csv").open("a") as fh:
        fh.write("g, bench/bench, user, bench\n")
    return lines + 1, (directory / "policy.csv").read_text()


def scrape(port: int) -> tuple[int, int]:
    """The gateway's policy generation and its count of rejected reloads, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    generation = GENERATION.search(text)
    rejected = REJECTED.search(text)
    if generation is None:
        raise SystemExit("the gateway's /metrics has no airlock_policy_generation")
    return int(float(generation.group(1))), int(float(rejected.group(1))) if rejected else 0


async def steady_load(stack: Stack, concurrency: int, samples: Samples, stop: asyncio.Event) -> None:
    assert stack.pki is not None
    token = mint_dev_token(stack.pki, stack.config.auth, tenant="bench", subject="bench", ttl_seconds=7200)
    metadata = (("authorization", f"Bearer {token}"),)
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=prompt(1024))],
        params=pb.SamplingParams(max_tokens=1024),
    )
    tls = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(stack.address, tls) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def loop() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    await stub.Generate(request, metadata=metadata, timeout=30)
                    ok = True
                except grpc.aio.AioRpcError:
                    ok = False
                samples.items.append((start, (time.perf_counter() - start) * 1000, ok))

        await asyncio.gather(*(loop() for _ in range(concurrency)))


async def run(stack: Stack, directory: Path, text: str, args: argparse.Namespace) -> dict[str, Any]:
    port = stack.metrics_port
    assert port is not None  # metrics_listen is set in CONFIG
    samples, stop = Samples(), asyncio.Event()
    load = asyncio.create_task(steady_load(stack, args.concurrency, samples, stop))
    await asyncio.sleep(args.warmup)
    reloads: list[tuple[float, float]] = []
    baselines: list[tuple[float, float]] = []
    reload_s: list[float] = []
    generation, rejected = await asyncio.to_thread(scrape, port)
    staging = directory.parent / "policy.csv.next"  # outside the watched directory
    for i in range(args.reloads):
        staging.write_text(text + f"# rewritten by bench/reload.py, round {i}\n")
        start = time.perf_counter()
        os.replace(staging, directory / "policy.csv")  # atomic, as an operator's deploy would be
        while True:
            await asyncio.sleep(0.05)
            now, rejected_now = await asyncio.to_thread(scrape, port)
            if rejected_now > rejected:
                raise SystemExit("the gateway rejected the rewritten policy; see its log")
            if now > generation:
                generation = now
                break
            if time.perf_counter() - start > 120:
                raise SystemExit("the gateway did not reload the policy within 120 s")
        reload_s.append(time.perf_counter() - start)
        await asyncio.sleep(args.settle)  # the retired generation is freed after the swap
        end = time.perf_counter()
        reloads.append((start, end))
        await asyncio.sleep(end - start)  # the same load for as long, with no reload
        baselines.append((end, time.perf_counter()))
    stop.set()
    await load
    during, without = samples.within(reloads), samples.within(baselines)
    failed = sum(not ok for _t, _ms, ok in samples.items)
    return {
        "requests": len(samples.items),
        "failed": failed,
        "reloads": len(reloads),
        "reload_seconds": reload_s,
        "final_generation": generation,
        "concurrency": args.concurrency,
        "during_reload_ms": summary([ms for _t, ms, ok in during if ok]),
        "without_reload_ms": summary([ms for _t, ms, ok in without if ok]),
        "failed_during_reload": sum(not ok for _t, _ms, ok in during),
        "failed_without_reload": sum(not ok for _t, _ms, ok in without),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 tenants, one reload (smoke test)")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--reloads", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight, steadily")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first window")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds a reload window lasts after the swap"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "reload.json")
    args = parser.parse_args()
    if args.quick:
        args.tenants, args.reloads, args.concurrency, args.warmup = 1_000, 1, 4, 0.5
    with tempfile.TemporaryDirectory(prefix="airlock-bench-reload-") as tmp:
        directory = Path(tmp) / "policy"
        lines, text = policy_dir(directory, args.tenants)
        path = Path(tmp) / "bench.toml"
        path.write_text(f'policy_dir = "{directory}"\n' + textwrap.dedent(CONFIG))
        cfg = config_mod.load(path, state_dir=Path(tmp) / "state")
        with Stack(cfg, listen="127.0.0.1:0", log_level="warning") as stack:
            print(f"starting a stack on a policy of {args.tenants} tenants, {lines} lines…", file=sys.stderr)
            stack.start(timeout=300)
            print(f"{args.reloads} reloads under {args.concurrency} requests in flight…", file=sys.stderr)
            results = asyncio.run(run(stack, directory, text, args))
    results["policy_lines"] = lines
    results["tenants"] = args.tenants
    base, during = results["without_reload_ms"], results["during_reload_ms"]
    rows = [
        Row(
            "7a",
            f"policy reload of {lines} lines under load: failed requests",
            f"{results['requests']} requests, {results['reloads']} reloads",
            results["failed"],
            "requests",
            None,
            "no failed request",
            0,
            "<=",
        ),
        Row(
            "7b",
            f"policy reload of {lines} lines under load: p99 latency",
            f"no reload {base['p99']:.2f} ms",
            during["p99"],
            "ms",
            during["p99"] / base["p99"],
            "≤ 2× the p99 with no reload",
            2 * base["p99"],
            "<=",
        ),
    ]
    print_rows(rows)
    write_report(args.out, "reload", rows, results, quick=args.quick)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
