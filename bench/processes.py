"""Several gateway cores (row 13 of docs/benchmarks.md): requests/s of a gateway of two processes
(`gateway.processes = 2`, gateway/group.py) against the same gateway as one process, in one run.

Two stacks run side by side (each its own state directory, EchoEngine worker and gateway); the load
comes from client processes of their own (`--clients`, each `--concurrency / clients` calls in flight
on a connection of its own per gateway), so the clients' event loops are not the gateway's. Windows
alternate between the stacks (rotating order) so the machine's noise hits both alike. The gateway's
CPU per request counts every process of it.

The target (>= 1.6x one process) assumes the client is not the limit (another machine, or a
rate-limited client): on a machine where the clients, the worker and the gateway share a few cores,
the row shows what those cores allow, and the JSON records how many there were.

    python bench/processes.py [--quick] [--seconds 20] [--rounds 10] [--clients 2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from bench_policy import bench_policy_dir  # noqa: E402
from common import RESULTS, Row, print_rows, write_report  # noqa: E402
from overhead import cpu_seconds, load, prompt  # noqa: E402

from airlock.v1 import inference_pb2 as pb  # noqa: E402
from airlock.v1 import inference_pb2_grpc  # noqa: E402
from control.launcher import Stack  # noqa: E402
from control.tokens import mint_dev_token  # noqa: E402
from gateway import config as config_mod  # noqa: E402

CONFIG = """
[gateway]
processes = {processes}
max_tokens = 2048

[models.echo]
engine = "echo"

[tenants.bench]
models = ["echo"]
"""


async def client(concurrency: int) -> None:
    """A client process: reads one JSON command per line from stdin ({"address", "ca", "token"} to
    connect, then {"seconds": S, "to": ADDRESS}), answers one JSON line per command."""
    request = pb.GenerateRequest(
        request_id="bench", messages=[pb.ChatMessage(role="user", content=prompt(1024))],
        params=pb.SamplingParams(max_tokens=1024),
    )  # fmt: skip
    stubs: dict[str, list[Any]] = {}
    metadata: dict[str, tuple[tuple[str, str], ...]] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        if "token" in command:  # a channel per loop: the kernel spreads connections over processes
            credentials = grpc.ssl_channel_credentials(Path(command["ca"]).read_bytes())
            stubs[command["address"]] = [
                inference_pb2_grpc.InferenceStub(
                    grpc.aio.secure_channel(
                        command["address"], credentials, options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
                for _ in range(concurrency)
            ]
            metadata[command["address"]] = (("authorization", f"Bearer {command['token']}"),)
            print(json.dumps({"ok": True}), flush=True)
            continue
        address = command["to"]
        turns = itertools.cycle(stubs[address])  # the loops take the connections in turn

        async def call(address: str = address, turns: Any = turns) -> object:
            return await next(turns).Generate(request, metadata=metadata[address], timeout=30)

        done, errors, elapsed = await load(call, command["seconds"], len(stubs[address]))
        print(json.dumps({"done": done, "errors": errors, "elapsed": elapsed}), flush=True)


class Clients:
    """`count` client processes, driven together."""

    def __init__(self, count: int, concurrency: int) -> None:
        per = max(1, concurrency // count)
        self.procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--client", str(per)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]

    def ask(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a client process exited ({proc.wait()})")
            answers.append(json.loads(line))
        return answers

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)


def gateway_pids(stack: Stack) -> list[int]:
    assert stack.gateway is not None
    others = [int(p["pid"]) for p in stack.gateway.info.get("processes", [])]
    return [stack.gateway.process.pid, *others]


def measure(stacks: dict[str, Stack], clients: Clients, args: argparse.Namespace) -> dict[str, Any]:
    for stack in stacks.values():
        assert stack.pki is not None
        token = mint_dev_token(
            stack.pki, stack.config.auth, tenant="bench", subject="bench", ttl_seconds=3600
        )
        clients.ask({"address": stack.address, "ca": str(stack.pki.ca_cert), "token": token})
        clients.ask({"to": stack.address, "seconds": 0.5})  # warm every connection and cache
    totals = {name: {"requests": 0, "errors": 0, "seconds": 0.0, "cpu_s": 0.0} for name in stacks}
    names = tuple(stacks)
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            pids = gateway_pids(stacks[name])
            before = sum(cpu_seconds(pid) for pid in pids)
            answers = clients.ask({"to": stacks[name].address, "seconds": args.seconds / args.rounds})
            totals[name]["cpu_s"] += sum(cpu_seconds(pid) for pid in pids) - before
            totals[name]["requests"] += sum(a["done"] for a in answers)
            totals[name]["errors"] += sum(a["errors"] for a in answers)
            totals[name]["seconds"] += max(a["elapsed"] for a in answers)
    return {
        name: {**t, "rps": t["requests"] / t["seconds"],
               "cpu_us_per_request": t["cpu_s"] / max(1, t["requests"]) * 1e6}
        for name, t in totals.items()
    }  # fmt: skip


def rows_of(results: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    one, two = results["one_process"]["rps"], results["two_processes"]["rps"]
    return [
        Row(
            "13",
            f"requests/s, gateway.processes = 2, {args.concurrency} in flight",
            f"one gateway process {one:.0f} req/s ({args.clients} client processes)",
            two,
            "req/s",
            two / one,
            "≥ 1.6× one process (client not the limit)",
            1.6 * one,
            ">=",
        )
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (smoke test)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per gateway, in all")
    parser.add_argument("--rounds", type=int, default=10, help="alternating windows per gateway")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight, over all clients")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # run as a client process
    parser.add_argument("--out", type=Path, default=RESULTS / "processes.json")
    args = parser.parse_args()
    if args.client is not None:
        asyncio.run(client(args.client))
        return 0
    if args.quick:
        args.seconds, args.rounds = 2.0, 2
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as tmp:
        stacks: dict[str, Stack] = {}
        clients = None
        try:
            for name, count in (("one_process", 1), ("two_processes", 2)):
                directory = Path(tmp) / name
                policy = bench_policy_dir(directory / "policy")
                path = directory / "bench.toml"
                path.write_text(
                    f'policy_dir = "{policy}"\n' + textwrap.dedent(CONFIG.format(processes=count))
                )
                cfg = config_mod.load(path, state_dir=directory / "state")
                print(f"starting a stack with a gateway of {count} process(es)…", file=sys.stderr)
                stacks[name] = Stack(cfg, listen="127.0.0.1:0", log_level="warning")
                stacks[name].start(timeout=120)
            clients = Clients(args.clients, args.concurrency)
            results = measure(stacks, clients, args)
        finally:
            if clients is not None:
                clients.close()
            for stack in stacks.values():
                stack.stop()
    results["cpus"] = os.cpu_count()
    rows = rows_of(results, args)
    print_rows(rows)
    write_report(args.out, "processes", rows, results, quick=args.quick)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
