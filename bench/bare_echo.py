"""The "bare gRPC echo hop" baseline: a grpc.aio server that answers Inference.Generate with the
prompt's own text and does nothing else (no interceptors, auth, policy, sealing or dispatch).

It is built by the gateway's own server factory (same message limits, keepalive rules, health and
reflection), serves the gateway's certificate on TLS, and runs as its own process with the same
allocator settings, so a client reaches it by the same stub, channel and message sizes as the
gateway: the difference between the two is what the gateway does beyond being one more gRPC hop.

    python bench/bare_echo.py --cert CERT --key KEY [--listen 127.0.0.1:0] --ready-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from airlock.v1 import inference_pb2 as pb  # noqa: E402
from airlock.v1 import inference_pb2_grpc  # noqa: E402
from serving.rpc import bind, new_server  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class EchoInference(inference_pb2_grpc.InferenceServicer):
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        text = request.messages[-1].content if request.messages else ""
        words = len(text.split())
        return pb.GenerateResponse(
            request_id=request.request_id,
            model=request.model or "echo",
            text=text,
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=words, completion_tokens=words),
        )


async def serve(args: argparse.Namespace) -> None:
    server, _health = new_server([], [SERVICE], max_message_bytes=args.max_message_bytes)
    inference_pb2_grpc.add_InferenceServicer_to_server(EchoInference(), server)
    identity = [(args.key.read_bytes(), args.cert.read_bytes())]
    port = bind(server, args.listen, grpc.ssl_server_credentials(identity))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    args.ready_file.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    await stop.wait()
    await server.stop(1)


class BenchChild:
    """A bench server script run as a child process until it wrote its ready file (a context
    manager): `script` with `args`, logging to `<run_dir>/<name>.log`."""

    def __init__(self, script: str, name: str, args: list[Any], run_dir: Path, env: dict[str, str]) -> None:
        self.ready = run_dir / f"{name}.ready"
        self.log = run_dir / f"{name}.log"
        self.ready.unlink(missing_ok=True)
        command = [sys.executable, script, *args, "--ready-file", self.ready]
        with self.log.open("ab") as fh:
            self.process = subprocess.Popen(
                [str(part) for part in command],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"{name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(json.loads(self.ready.read_text())["port"])
        self.pid = self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BareEcho(BenchChild):
    """The bare echo server as a child process, for the benchmarks (a context manager)."""

    def __init__(self, cert: Path, key: Path, run_dir: Path, env: dict[str, str]) -> None:
        super().__init__(__file__, "bare-echo", ["--cert", cert, "--key", key], run_dir, env)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--max-message-bytes", type=int, default=4 << 20)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
