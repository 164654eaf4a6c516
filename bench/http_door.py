"""The HTTP door against the gRPC door (rows 10a-10e of docs/benchmarks.md): the same request (a
1 KiB prompt, EchoEngine, 1 KiB back) through each door of one gateway, at 1 and at 64 in flight.

Both doors serve one gateway process, so the difference is the door alone: its protocol, TLS
connection handling and the JSON translation, in front of one guard and one pipeline. The gRPC
side is a raw stub on one channel (as bench/overhead.py); the HTTP side a minimal HTTP/1.1
keep-alive client over TLS (one connection per call in flight, as HTTP/1.1 needs), so neither
measurement carries a heavy client library's own cost. Measurements are interleaved (rounds of
both doors in rotating order) and the gateway's CPU time is read with psutil over each door's windows.

- 10a/10b: unary p50 at 1 and at 64 in flight: HTTP <= gRPC + 1 ms (1), <= 1.5x gRPC's (64).
- 10c/10d: gateway CPU per request at 1 and at 64 in flight: HTTP <= 1.5x the gRPC door's.
- 10e: HTTP door CPU per request <= 1.4 ms: 10x less than the LiteLLM proxy's 14-17 ms (the issue's
  figure on this kind of machine, default settings, one worker, instant upstream; not measured here).

    python bench/http_door.py [--quick] [--requests 2000] [--seconds 12] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from bench_policy import bench_policy_dir  # noqa: E402
from common import RESULTS, Row, print_rows, summary, write_report  # noqa: E402
from overhead import cpu_seconds, prompt, rotated  # noqa: E402

from airlock.v1 import inference_pb2 as pb  # noqa: E402
from airlock.v1 import inference_pb2_grpc  # noqa: E402
from control.launcher import Stack  # noqa: E402
from control.tokens import mint_dev_token  # noqa: E402
from gateway import config as config_mod  # noqa: E402

CONFIG = """
[gateway]
max_tokens = 8192
max_message_bytes = 4194304

[models.echo]
engine = "echo"

[tenants.bench]
models = ["echo"]
"""

Call = Callable[[], Awaitable[object]]
DOORS = ("grpc", "http")
LITELLM_CPU_US = 14_000  # the lower figure for the LiteLLM proxy


class HttpConnection:
    """One keep-alive HTTP/1.1 connection over TLS that posts one prepared request at a time."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, request: bytes) -> None:
        self.host, self.port, self.context, self.request = host, port, context, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.context)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        lines = head.lower().split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:"))
        body = await self.reader.readexactly(length)
        if b"connection: close" in lines:  # the server's keep_alive_max_requests: reconnect, as clients do
            await self.close()
        return body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def timed_rounds(
    calls: dict[str, list[Call]], pid: int, n: int, rounds: int, warmup: int
) -> dict[str, Any]:
    """`len(calls[door])` loops per door calling back to back, `n` calls per door in all, as
    `rounds` interleaved windows: per-call latency (ms) and the gateway's CPU per request (µs)."""
    for door in calls:
        await asyncio.gather(*(_loop(call, warmup, []) for call in calls[door]))
    samples: dict[str, list[float]] = {door: [] for door in calls}
    cpu = dict.fromkeys(calls, 0.0)
    wall = dict.fromkeys(calls, 0.0)
    per_round = max(1, n // (rounds * max(len(c) for c in calls.values())))  # per loop
    for r in range(rounds):
        for door in rotated(r, tuple(calls)):
            before, start = cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(_loop(call, per_round, samples[door]) for call in calls[door]))
            wall[door] += time.perf_counter() - start
            cpu[door] += cpu_seconds(pid) - before
    return {
        door: {
            **summary(samples[door]),
            "in_flight": len(calls[door]),
            "rps": len(samples[door]) / wall[door],
            "gateway_cpu_us_per_request": cpu[door] / len(samples[door]) * 1e6,
        }
        for door in calls
    }


async def _loop(call: Call, count: int, into: list[float]) -> None:
    for _ in range(count):
        start = time.perf_counter()
        await call()
        into.append((time.perf_counter() - start) * 1000)


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    pki = stack.pki
    assert pki is not None and stack.gateway is not None and stack.http_address is not None
    text = prompt(1024)
    token = mint_dev_token(pki, stack.config.auth, tenant="bench", subject="bench", ttl_seconds=3600)
    request = pb.GenerateRequest(model="echo", messages=[pb.ChatMessage(role="user", content=text)],
                                 params=pb.SamplingParams(max_tokens=1024))  # fmt: skip
    metadata = (("authorization", f"Bearer {token}"),)
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": text}], "max_tokens": 1024})
    host, port = stack.http_address.rsplit(":", 1)
    http_request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    pid = stack.gateway.process.pid
    results: dict[str, Any] = {}
    async with grpc.aio.secure_channel(
        stack.address, grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    ) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def through_grpc() -> object:
            return await stub.Generate(request, metadata=metadata, timeout=30)

        for in_flight, n in ((1, args.requests), (args.concurrency, args.requests * 8)):
            connections = [HttpConnection(host, int(port), context, http_request) for _ in range(in_flight)]
            calls: dict[str, list[Call]] = {
                "grpc": [through_grpc] * in_flight,
                "http": [c.call for c in connections],
            }
            print(f"{n} calls per door at {in_flight} in flight, {args.rounds} rounds…", file=sys.stderr)
            results[f"unary_{in_flight}_in_flight"] = await timed_rounds(
                calls, pid, n, args.rounds, args.warmup
            )
            for c in connections:
                await c.close()
    return results


def rows_of(results: dict[str, Any], concurrency: int) -> list[Row]:
    one, many = results["unary_1_in_flight"], results[f"unary_{concurrency}_in_flight"]
    rows = [
        Row("10a", "HTTP door unary p50, 1 KiB, EchoEngine, 1 in flight",
            f"gRPC door {one['grpc']['p50']:.3f} ms", one["http"]["p50"], "ms",
            one["http"]["p50"] / one["grpc"]["p50"], "≤ gRPC door's p50 + 1 ms",
            one["grpc"]["p50"] + 1.0, "<="),
        Row("10b", f"HTTP door unary p50, {concurrency} in flight",
            f"gRPC door {many['grpc']['p50']:.3f} ms", many["http"]["p50"], "ms",
            many["http"]["p50"] / many["grpc"]["p50"], "≤ 1.5× the gRPC door's",
            1.5 * many["grpc"]["p50"], "<="),
    ]  # fmt: skip
    for rid, label, r in (("10c", "1 in flight", one), ("10d", f"{concurrency} in flight", many)):
        g, h = r["grpc"]["gateway_cpu_us_per_request"], r["http"]["gateway_cpu_us_per_request"]
        rows.append(Row(rid, f"gateway CPU per request, HTTP door, {label}", f"gRPC door {g:.0f} µs", h, "µs",
                        h / g, "≤ 1.5× the gRPC door's", 1.5 * g, "<="))  # fmt: skip
    h = many["http"]["gateway_cpu_us_per_request"]
    rows.append(Row("10e", f"gateway CPU per request, HTTP door, {concurrency} in flight, vs LiteLLM proxy",
                    "LiteLLM proxy 14–17 ms (issue's figure)", h, "µs", h / LITELLM_CPU_US,
                    "≥ 10× less than LiteLLM's", LITELLM_CPU_US / 10, "<="))  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--requests", type=int, default=2000, help="calls per door at 1 in flight (8x at 64)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the two doors")
    parser.add_argument("--warmup", type=int, default=100, help="calls per loop before measuring")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "http_door.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.warmup = 60, 2, 5
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        path = Path(tmp) / "bench.toml"
        policy = bench_policy_dir(Path(tmp) / "policy")
        path.write_text(f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG))
        cfg = config_mod.load(path, state_dir=Path(tmp) / "state")
        with Stack(cfg, listen="127.0.0.1:0", log_level="warning") as stack:
            print("starting the worker and the gateway…", file=sys.stderr)
            stack.start(timeout=120)
            results = asyncio.run(measure(stack, args))
    rows = rows_of(results, args.concurrency)
    print_rows(rows)
    write_report(args.out, "http_door", rows, results, quick=args.quick)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
