"""The "bare relay" baseline: a grpc.aio server that relays `Worker/GenerateStream` to a worker and
does nothing else (no auth, policy, quota, sealing, audit or decoding: request and chunks pass as
bytes, one upstream call per stream), the least any Python gRPC relay can spend per token.

It is built by the gateway's own server factory (same limits, keepalive rules, health and
reflection), serves the gateway's certificate on TLS, reaches the worker with the gateway's client
certificate (mTLS) over a few connections (one HTTP/2 connection carries at most 256 streams), and
runs as its own process with the same allocator settings, so bench/capacity.py can set its CPU per
relayed token beside the gateway's.

    python bench/bare_relay.py --cert CERT --key KEY --ca CA --upstream HOST:PORT --ready-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from bare_echo import BenchChild  # noqa: E402

from serving.rpc import bind, new_server  # noqa: E402

METHOD = "/airlock.v1.Worker/GenerateStream"
UPSTREAM_CONNECTIONS = 4


async def serve(args: argparse.Namespace) -> None:
    credentials = grpc.ssl_channel_credentials(
        args.ca.read_bytes(), args.key.read_bytes(), args.cert.read_bytes()
    )
    upstreams = [
        grpc.aio.secure_channel(args.upstream, credentials, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(UPSTREAM_CONNECTIONS)
    ]
    calls = itertools.cycle([channel.unary_stream(METHOD) for channel in upstreams])  # bytes in, bytes out

    async def relay(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for chunk in next(calls)(request, timeout=context.time_remaining()):
            yield chunk

    server, _health = new_server([], [], max_message_bytes=args.max_message_bytes)
    handler = grpc.unary_stream_rpc_method_handler(relay)
    service, method = METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service[1:], {method: handler}),))
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
    for channel in upstreams:
        await channel.close()


class BareRelay(BenchChild):
    """The bare relay as a child process, for the benchmarks (a context manager)."""

    def __init__(
        self, cert: Path, key: Path, ca: Path, upstream: str, run_dir: Path, env: dict[str, str]
    ) -> None:
        args = ["--cert", cert, "--key", key, "--ca", ca, "--upstream", upstream]
        super().__init__(__file__, "bare-relay", args, run_dir, env)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--max-message-bytes", type=int, default=4 << 20)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
