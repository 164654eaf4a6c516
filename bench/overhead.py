"""Gateway overhead: the same EchoEngine worker called directly and through the gateway.

Both paths use real processes and real TLS (mTLS to the worker, TLS + JWT to the gateway) and the
same raw stubs, so the difference is what the gateway adds: auth, validation, routing, one more hop.
Prints a table and writes bench/results/overhead.json. Figures are ratios within one run, because
the machines are shared and noisy.

    python bench/overhead.py [--requests 2000] [--seconds 10] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from bench_policy import bench_policy_dir  # noqa: E402

from airlock.attestation import AttestationPolicy  # noqa: E402
from airlock.v1 import inference_pb2 as pb  # noqa: E402
from airlock.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402
from gateway import config as config_mod  # noqa: E402
from gateway.audit import AuditLog  # noqa: E402
from gateway.keystore import open_keystore  # noqa: E402
from gateway.sealing import GatewaySealing, open_text  # noqa: E402
from gateway.stack import Stack  # noqa: E402
from gateway.tokens import mint_dev_token  # noqa: E402

CONFIG = """
[gateway]
max_tokens = 1024
max_message_bytes = 4194304

[models.echo]
engine = "echo"

[tenants.bench]
models = ["echo"]
"""

Call = Callable[[], Awaitable[object]]


def prompt_1kib() -> str:
    words, size = [], 0
    while size < 1024:
        word = f"tok{len(words):04d}"
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:1024]


async def latency(call: Call, n: int) -> dict[str, float]:
    for _ in range(min(200, n)):  # warm up connections and caches
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "mean_ms": statistics.fmean(samples),
        "n": n,
    }


async def throughput(call: Call, seconds: float, concurrency: int) -> dict[str, float]:
    done = 0
    errors = 0
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
    elapsed = time.perf_counter() - start
    return {"rps": done / elapsed, "requests": done, "errors": errors, "concurrency": concurrency}


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    pki = stack.pki
    assert pki is not None  # started above
    text = prompt_1kib()
    request = pb.GenerateRequest(
        request_id="bench",
        messages=[pb.ChatMessage(role="user", content=text)],
        params=pb.SamplingParams(max_tokens=1024),
    )
    worker_creds = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.gateway_key.read_bytes(), pki.gateway_cert.read_bytes()
    )
    worker_port = stack.workers[("bench", "echo")].port
    token = mint_dev_token(pki, stack.config.auth, tenant="bench", subject="bench", ttl_seconds=3600)
    metadata = (("authorization", f"Bearer {token}"),)
    results: dict[str, dict[str, dict[str, float]]] = {}
    async with (
        grpc.aio.secure_channel(f"127.0.0.1:{worker_port}", worker_creds) as wch,
        grpc.aio.secure_channel(stack.address, grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())) as gch,
    ):
        worker = worker_pb2_grpc.WorkerStub(wch)
        gateway = inference_pb2_grpc.InferenceStub(gch)
        # Workers take only sealed prompts: the direct path seals and opens like the gateway does
        # (after attesting the worker and releasing the tenant key), the least any caller pays.
        sealing = GatewaySealing(
            open_keystore(stack.config.keys, stack.config.state_dir), ca_pem=pki.attest_ca_cert.read_bytes(),
            policy_for=lambda _tenant: AttestationPolicy(), audit=AuditLog(None),
        )  # fmt: skip
        await sealing.ensure_released("bench", "echo", worker)

        async def direct() -> object:
            work = worker_pb2.WorkerRequest(tenant="bench", request=request)
            work.request.model = "echo"
            opener = sealing.seal("bench", work.request)
            assert opener is not None
            reply = await worker.Generate(work, timeout=30)
            return open_text(opener, reply.sealed_text, "bench", sealing.audit)

        async def through() -> object:
            return await gateway.Generate(request, metadata=metadata, timeout=30)

        for name, call in (("direct", direct), ("gateway", through)):
            results[name] = {
                "unary_1_in_flight": await latency(call, args.requests),
                f"unary_{args.concurrency}_in_flight": await throughput(call, args.seconds, args.concurrency),
            }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests for latency")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the throughput run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        path = Path(tmp) / "bench.toml"
        policy = bench_policy_dir(Path(tmp) / "policy")
        path.write_text(f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG))
        cfg = config_mod.load(path, state_dir=Path(tmp) / "state")
        with Stack(cfg, listen="127.0.0.1:0", log_level="warning") as stack:
            print("starting worker and gateway…", file=sys.stderr)
            stack.start(timeout=120)
            print(f"measuring: {args.requests} sequential requests, then {args.seconds:.0f} s at "
                  f"{args.concurrency} in flight, for each path…", file=sys.stderr)  # fmt: skip
            results = asyncio.run(measure(stack, args))
    tput = f"unary_{args.concurrency}_in_flight"
    d, g = results["direct"], results["gateway"]
    rows = [
        (
            "unary p50 (ms), 1 KiB, 1 in flight",
            d["unary_1_in_flight"]["p50_ms"],
            g["unary_1_in_flight"]["p50_ms"],
        ),
        (
            "unary p99 (ms), 1 KiB, 1 in flight",
            d["unary_1_in_flight"]["p99_ms"],
            g["unary_1_in_flight"]["p99_ms"],
        ),
        (f"requests/s, {args.concurrency} in flight", d[tput]["rps"], g[tput]["rps"]),
    ]
    print(f"\n{'metric':<40} {'direct':>10} {'gateway':>10} {'ratio':>8} {'added':>9}")
    for label, direct, gateway in rows:
        print(
            f"{label:<40} {direct:>10.3f} {gateway:>10.3f} {gateway / direct:>8.2f} {gateway - direct:>+9.3f}"
        )
    report = {
        "benchmark": "overhead",
        "engine": "echo",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "results": results,
        "ratios": {
            "p50_gateway_over_direct": g["unary_1_in_flight"]["p50_ms"] / d["unary_1_in_flight"]["p50_ms"],
            "p99_gateway_over_direct": g["unary_1_in_flight"]["p99_ms"] / d["unary_1_in_flight"]["p99_ms"],
            "rps_gateway_over_direct": g[tput]["rps"] / d[tput]["rps"],
        },
        "added_ms": {
            "p50": g["unary_1_in_flight"]["p50_ms"] - d["unary_1_in_flight"]["p50_ms"],
            "p99": g["unary_1_in_flight"]["p99_ms"] - d["unary_1_in_flight"]["p99_ms"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
