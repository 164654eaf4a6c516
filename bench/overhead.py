"""Gateway overhead (rows 1-4 of docs/benchmarks.md): the same EchoEngine worker called directly and
through the gateway, beside a bare gRPC echo hop (bench/bare_echo.py).

All paths use real processes, real TLS and the same raw stubs and message sizes: `direct` is the
client to the worker (mTLS; it seals and opens like the gateway does), `bare` is the client to a
grpc.aio server that only echoes (same TLS, same stub, same 1 KiB prompt and reply), `gateway` is
the client to the gateway (TLS + JWT) and on to the worker. Measurements are interleaved: rounds of
direct / bare / gateway in rotating order, so the noise of this shared machine hits all alike.

- Row 1, unary latency at 1 in flight: gateway p50 <= direct p50 + bare p50 + 0.2 ms, and
  p99 <= direct p99 + bare p99 + 1 ms.
- Row 2, CPU per request at 64 in flight: gateway process CPU time / requests <= 2.5x the bare
  server's (both from psutil: user + system time of that process over the same-length windows).
- Row 3, requests/s at 64 in flight: gateway >= 50% of direct.
- Row 4, streaming tokens/s (one stream of many EchoEngine tokens at a time): gateway >= 97% of direct.

`--profile SVG` instead records a py-spy flame graph of the gateway under the 64-in-flight load (a
`.txt` path: collapsed stacks, one line per stack with its sample count, as capacity.py writes).
Writes bench/results/overhead.json.

    python bench/overhead.py [--quick] [--requests 2000] [--seconds 12] [--streams 12] [--profile SVG]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402
from bare_echo import BareEcho  # noqa: E402
from bench_policy import bench_policy_dir  # noqa: E402
from common import RESULTS, Row, print_rows, summary, write_report  # noqa: E402

from airlock.attestation import AttestationPolicy  # noqa: E402
from airlock.types import GenerationSpec, validate_request  # noqa: E402
from airlock.v1 import inference_pb2 as pb  # noqa: E402
from airlock.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402
from control.launcher import ALLOCATOR_ENV, Stack  # noqa: E402
from control.tokens import mint_dev_token  # noqa: E402
from gateway import config as config_mod  # noqa: E402
from gateway.audit import AuditLog  # noqa: E402
from gateway.keys import open_keystore  # noqa: E402
from gateway.sealing import GatewaySealing, finish, open_text  # noqa: E402

CONFIG = """
[gateway]
max_tokens = 8192
max_message_bytes = 4194304

[models.echo]
engine = "echo"

# Row 4: as fast as it can, but yielding to the event loop between tokens as a real engine does
# between decoding steps (an unthrottled EchoEngine never yields, so a stream would leave the
# worker as one chunk). Far above what either path delivers: the rate never binds.
[models.echo-stream]
engine = "echo"
tokens_per_second = 1000000

[tenants.bench]
models = ["echo", "echo-stream"]
"""

Call = Callable[[], Awaitable[object]]
PATHS = ("direct", "bare", "gateway")


def prompt(size: int) -> str:
    """`size` bytes of distinct words: EchoEngine answers one token per word."""
    words, total = [], 0
    while total < size:
        word = f"tok{len(words):04d}"
        words.append(word)
        total += len(word) + 1
    return " ".join(words)[:size]


def rotated(round_: int, names: tuple[str, ...]) -> list[str]:
    k = round_ % len(names)
    return list(names[k:] + names[:k])


async def latency_rounds(calls: dict[str, Call], n: int, rounds: int, warmup: int) -> dict[str, Any]:
    """`n` sequential calls per path, as `rounds` interleaved blocks; milliseconds per call."""
    for call in calls.values():
        for _ in range(warmup):
            await call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, n // rounds)
    for r in range(rounds):
        for name in rotated(r, tuple(calls)):
            call = calls[name]
            for _ in range(per_round):
                start = time.perf_counter()
                await call()
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: summary(s) for name, s in samples.items()}


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def load(call: Call, seconds: float, concurrency: int) -> tuple[int, int, float]:
    """`concurrency` loops calling back to back for `seconds`: (requests done, errors, elapsed)."""
    done = errors = 0
    end = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done, errors
        while time.perf_counter() < end:
            try:
                await call()
                done += 1
            except grpc.aio.AioRpcError:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, errors, time.perf_counter() - start


async def throughput_rounds(
    calls: dict[str, Call],
    pids: dict[str, dict[str, int | None]],
    seconds: float,
    rounds: int,
    concurrency: int,
) -> dict[str, Any]:
    """Each path for `seconds` in all, as `rounds` interleaved windows; requests/s and, for each
    process in `pids[path]`, its CPU time per request over that path's windows."""
    totals = {name: {"requests": 0, "errors": 0, "seconds": 0.0} for name in calls}
    cpu = {name: dict.fromkeys(pids[name], 0.0) for name in calls}
    for name in calls:  # warm up every connection and the gateway's caches at this concurrency
        await load(calls[name], 0.3, concurrency)
    for r in range(rounds):
        for name in rotated(r, tuple(calls)):
            before = {proc: cpu_seconds(pid) for proc, pid in pids[name].items()}
            done, errors, elapsed = await load(calls[name], seconds / rounds, concurrency)
            for proc, pid in pids[name].items():
                cpu[name][proc] += cpu_seconds(pid) - before[proc]
            totals[name]["requests"] += done
            totals[name]["errors"] += errors
            totals[name]["seconds"] += elapsed
    out: dict[str, Any] = {}
    for name, t in totals.items():
        requests = max(1, int(t["requests"]))
        out[name] = {
            **t,
            "rps": t["requests"] / t["seconds"],
            "concurrency": concurrency,
            "cpu_us_per_request": {p: s / requests * 1e6 for p, s in cpu[name].items()},
        }
    return out


async def stream_rounds(
    streams: dict[str, Callable[[], Awaitable[tuple[int, int]]]], rounds: int
) -> dict[str, Any]:
    """One stream at a time, interleaved; tokens/s per path over all its streams, and how many
    chunks carried them (what piled up while a chunk was on its way travels as one)."""
    for stream in streams.values():
        await stream()  # warm up
    tokens = dict.fromkeys(streams, 0)
    chunks = dict.fromkeys(streams, 0)
    seconds = dict.fromkeys(streams, 0.0)
    for r in range(rounds):
        for name in rotated(r, tuple(streams)):
            start = time.perf_counter()
            got, pieces = await streams[name]()
            seconds[name] += time.perf_counter() - start
            tokens[name] += got
            chunks[name] += pieces
    return {
        name: {
            "tokens": tokens[name],
            "chunks": chunks[name],
            "seconds": seconds[name],
            "streams": rounds,
            "tokens_per_s": tokens[name] / seconds[name],
        }
        for name in streams
    }


async def measure(stack: Stack, bare: BareEcho, args: argparse.Namespace) -> dict[str, Any]:
    pki = stack.pki
    assert pki is not None  # started by the caller
    assert stack.gateway is not None
    text = prompt(1024)
    request = pb.GenerateRequest(
        request_id="bench",
        messages=[pb.ChatMessage(role="user", content=text)],
        params=pb.SamplingParams(max_tokens=1024),
    )
    long_request = pb.GenerateRequest(
        request_id="bench-stream",
        model="echo-stream",
        messages=[pb.ChatMessage(role="user", content=prompt(args.stream_bytes))],
        params=pb.SamplingParams(max_tokens=8192),
    )
    worker_creds = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.gateway_key.read_bytes(), pki.gateway_cert.read_bytes()
    )
    tls = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    worker_child = stack.workers[("bench", "echo")]
    stream_child = stack.workers[("bench", "echo-stream")]
    token = mint_dev_token(pki, stack.config.auth, tenant="bench", subject="bench", ttl_seconds=3600)
    metadata = (("authorization", f"Bearer {token}"),)
    async with (
        grpc.aio.secure_channel(f"127.0.0.1:{worker_child.port}", worker_creds) as wch,
        grpc.aio.secure_channel(f"127.0.0.1:{stream_child.port}", worker_creds) as sch,
        grpc.aio.secure_channel(stack.address, tls) as gch,
        grpc.aio.secure_channel(f"127.0.0.1:{bare.port}", tls) as bch,
    ):
        worker = worker_pb2_grpc.WorkerStub(wch)
        stream_worker = worker_pb2_grpc.WorkerStub(sch)
        gateway = inference_pb2_grpc.InferenceStub(gch)
        bare_stub = inference_pb2_grpc.InferenceStub(bch)
        # Workers take only sealed prompts: the direct path seals and opens like the gateway does
        # (after attesting the worker and releasing the tenant key), the least any caller pays.
        sealing = GatewaySealing(
            open_keystore(stack.config.keys, stack.config.state_dir),
            ca_pem=pki.attest_ca_cert.read_bytes(),
            policy_for=lambda _tenant: AttestationPolicy(),
            audit=AuditLog(None),
        )
        await sealing.ensure_released("bench", "echo", worker)
        await sealing.ensure_released("bench", "echo-stream", stream_worker)

        # What the gateway's guard resolves once per call, and the worker request it builds from it.
        limits = stack.config.gateway.limits
        spec = replace(validate_request(request, limits, request.request_id), model="echo")
        long_spec = validate_request(long_request, limits, long_request.request_id)

        def worker_request(spec: GenerationSpec, caller: pb.GenerateRequest) -> tuple[Any, Any]:
            work = worker_pb2.WorkerRequest(tenant="bench")
            work.request.request_id, work.request.model = spec.request_id, spec.model
            work.request.params.CopyFrom(spec.sampling.to_proto())
            opener = sealing.seal("bench", spec, caller, work.request)
            assert opener is not None
            return work, opener

        async def direct() -> object:
            work, opener = worker_request(spec, request)
            reply = await worker.Generate(work, timeout=30)
            out = open_text(opener, reply.sealed_text, "bench", sealing.audit)
            finish(opener, "bench", sealing.audit)
            return out

        async def via_bare() -> object:
            return await bare_stub.Generate(request, metadata=metadata, timeout=30)

        async def through() -> object:
            return await gateway.Generate(request, metadata=metadata, timeout=30)

        async def stream_direct() -> tuple[int, int]:
            work, opener = worker_request(long_spec, long_request)
            tokens = chunks = 0
            async for chunk in stream_worker.GenerateStream(work, timeout=120):
                chunk.text = open_text(opener, chunk.sealed_text, "bench", sealing.audit)
                tokens += chunk.tokens
                chunks += 1
            finish(opener, "bench", sealing.audit)
            return tokens, chunks

        async def stream_gateway() -> tuple[int, int]:
            tokens = chunks = 0
            async for chunk in gateway.GenerateStream(long_request, metadata=metadata, timeout=120):
                tokens += chunk.tokens
                chunks += 1
            return tokens, chunks

        calls = {"direct": direct, "bare": via_bare, "gateway": through}
        if args.profile is not None:
            return {"profile": await profile(through, stack.gateway.process.pid, args)}
        pids: dict[str, dict[str, int | None]] = {
            "direct": {"worker": worker_child.process.pid},
            "bare": {"bare_server": bare.pid},
            "gateway": {"gateway": stack.gateway.process.pid, "worker": worker_child.process.pid},
        }
        print(f"row 1: {args.requests} sequential calls per path in {args.rounds} rounds…", file=sys.stderr)
        lat = await latency_rounds(calls, args.requests, args.rounds, args.warmup)
        print(f"rows 2-3: {args.seconds:.0f} s per path at {args.concurrency} in flight…", file=sys.stderr)
        tput = await throughput_rounds(calls, pids, args.seconds, args.rounds, args.concurrency)
        print(f"row 4: {args.streams} streams of {args.stream_bytes} bytes per path…", file=sys.stderr)
        stream = await stream_rounds({"direct": stream_direct, "gateway": stream_gateway}, args.streams)
    return {"unary_1_in_flight_ms": lat, f"unary_{args.concurrency}_in_flight": tput, "stream": stream}


async def profile(call: Call, pid: int, args: argparse.Namespace) -> str:
    """py-spy records the gateway process while `args.concurrency` calls are in flight."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (it is in the dev extra: make venv)")
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    await load(call, 1.0, args.concurrency)  # warm up before recording
    recorder = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--output",
            str(args.profile),
            "--format",
            "raw" if args.profile.suffix == ".txt" else "flamegraph",  # raw: collapsed stacks, to count
            "--rate",
            "200",
            # Read the stacks without pausing the gateway: the profile then costs it little.
            "--nonblocking",
            "--duration",
            str(int(args.seconds)),
        ]
    )
    done, errors, elapsed = await load(call, args.seconds + 1, args.concurrency)
    if await asyncio.to_thread(recorder.wait) != 0:
        raise SystemExit(
            f"py-spy failed (exit {recorder.returncode}); as root it needs the ptrace capability"
        )
    return f"{done / elapsed:.0f} requests/s during the recording, {errors} errors"


def rows_of(results: dict[str, Any], concurrency: int) -> list[Row]:
    lat = results["unary_1_in_flight_ms"]
    d, b, g = lat["direct"], lat["bare"], lat["gateway"]
    tput = results[f"unary_{concurrency}_in_flight"]
    g_cpu = tput["gateway"]["cpu_us_per_request"]["gateway"]
    b_cpu = tput["bare"]["cpu_us_per_request"]["bare_server"]
    rps_d, rps_g = tput["direct"]["rps"], tput["gateway"]["rps"]
    st_d, st_g = results["stream"]["direct"]["tokens_per_s"], results["stream"]["gateway"]["tokens_per_s"]
    rows = []
    for q, slack, rid in (("p50", 0.2, "1a"), ("p99", 1.0, "1b")):
        base = d[q] + b[q]
        rows.append(
            Row(
                rid,
                f"unary latency {q}, 1 KiB, EchoEngine, 1 in flight",
                f"direct {d[q]:.3f} + bare hop {b[q]:.3f} = {base:.3f} ms",
                g[q],
                "ms",
                g[q] / base,
                f"≤ direct {q} + bare-hop {q} + {slack} ms",
                base + slack,
                "<=",
            )
        )
    rows += [
        Row(
            "2",
            f"gateway CPU per request, {concurrency} in flight",
            f"bare grpc.aio echo server {b_cpu:.0f} µs",
            g_cpu,
            "µs",
            g_cpu / b_cpu,
            "≤ 2.5× the bare server's",
            2.5 * b_cpu,
            "<=",
        ),
        Row(
            "3",
            f"throughput, {concurrency} in flight",
            f"direct to worker {rps_d:.0f} req/s",
            rps_g,
            "req/s",
            rps_g / rps_d,
            "≥ 50% of direct",
            0.5 * rps_d,
            ">=",
        ),
        Row(
            "4",
            "streaming tokens/s, EchoEngine, 1 stream",
            f"direct to worker {st_d:.0f} tokens/s",
            st_g,
            "tokens/s",
            st_g / st_d,
            "≥ 97% of direct",
            0.97 * st_d,
            ">=",
        ),
    ]
    errors = sum(t["errors"] for t in tput.values())
    if errors:
        print(f"warning: {errors} failed requests during the throughput windows", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--requests", type=int, default=2000, help="sequential calls per path (row 1)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the three paths")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="time per path at --concurrency (rows 2-3)"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=12, help="streams per path (row 4)")
    parser.add_argument("--stream-bytes", type=int, default=24_000, help="prompt size: ~1 token per 8 bytes")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record a py-spy flame graph (SVG; a .txt path: collapsed stacks) of the gateway instead",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.warmup = 60, 3, 10
        args.seconds, args.streams, args.stream_bytes = 1.5, 2, 4000
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        path = Path(tmp) / "bench.toml"
        policy = bench_policy_dir(Path(tmp) / "policy")
        path.write_text(f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG))
        cfg = config_mod.load(path, state_dir=Path(tmp) / "state")
        with Stack(cfg, listen="127.0.0.1:0", log_level="warning") as stack:
            print("starting worker, gateway and the bare echo server…", file=sys.stderr)
            stack.start(timeout=120)
            assert stack.pki is not None
            with BareEcho(stack.pki.gateway_cert, stack.pki.gateway_key, Path(tmp), ALLOCATOR_ENV) as bare:
                results = asyncio.run(measure(stack, bare, args))
    if args.profile is not None:
        print(f"flame graph written to {args.profile} ({results['profile']})")
        return 0
    rows = rows_of(results, args.concurrency)
    print_rows(rows)
    write_report(args.out, "overhead", rows, results, quick=args.quick)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
