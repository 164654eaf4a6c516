"""Worker process entry point: `python -m worker --tenant T --model M ...` (started by `airlock up`).

A shared worker (`--isolation shared`) names every tenant it serves, each with its own attestation
certificate and key, in the same order: `--tenant A --attest-cert A.crt --attest-key A.key --tenant B ...`.

Settings arrive as explicit arguments from the launcher; nothing is read from the environment
except what the launcher put there for the isolation domain (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from grpc_health.v1 import health_pb2

from airlock.attestation import SUITES
from airlock.types import Limits
from serving import logs
from worker.attestation import WorkerAttestor
from worker.engine import Engine
from worker.engines.models import BundlePolicy
from worker.isolation.arena import SCRUB_MODES, Arena, RequestState, write_cuda_canaries
from worker.server import SERVICE, WorkerService, WorkerTls, create_server

_log = logging.getLogger("airlock.worker")

# Set by the worker itself, not left to the operator: nothing is fetched from a hub, nothing reported.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass(frozen=True)
class WorkerSettings:
    tenant: str  # the first (a dedicated worker's only) tenant
    model: str
    engine: str
    model_path: str
    cache_dir: Path
    listen: str
    tls: WorkerTls
    limits: Limits
    ready_file: Path | None = None
    echo_tokens_per_second: float = 0.0
    threads: int = 0
    device: str = "cpu"
    grace_seconds: float = 10.0
    max_message_bytes: int = 4 << 20
    bundles: BundlePolicy = field(default_factory=BundlePolicy)
    hpke_suite: str = SUITES[0]
    attest_cert: Path | None = None  # the tenant's worker attestation certificate (attestation CA)
    attest_key: Path | None = None
    arena: Path | None = None  # the CPU domain's memory arena (/dev/shm), scrubbed after exit
    arena_bytes: int = 16 << 20
    canary_file: Path | None = None  # where the canaries' hashes go for the scrubber
    scrub: str = "request"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    isolation: str = "dedicated"
    # True: callers' text may spell the chat template's control tokens (the model's opt-out).
    allow_special_tokens: bool = False
    # A shared worker's other tenants, each with its attestation certificate and key.
    others: tuple[tuple[str, Path, Path], ...] = ()

    @property
    def tenants(self) -> tuple[str, ...]:
        return (self.tenant, *(t for t, _, _ in self.others))


def parse_args(argv: list[str] | None = None) -> WorkerSettings:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--tenant", required=True, action="append", help="repeatable with --isolation shared")
    p.add_argument("--model", required=True, help="model name callers use")
    p.add_argument("--engine", choices=("transformers", "echo", "vllm"), default="transformers")
    p.add_argument("--model-path", default="bundled", help="'bundled' or a local HF model directory")
    p.add_argument("--cache-dir", type=Path, required=True, help="where converted models are kept")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--tls-cert", type=Path, required=True)
    p.add_argument("--tls-key", type=Path, required=True)
    p.add_argument("--client-ca", type=Path, required=True)
    p.add_argument("--allowed-peer", default="airlock-gateway")
    p.add_argument("--ready-file", type=Path)
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens)
    p.add_argument("--default-max-tokens", type=int, default=Limits.default_max_tokens)
    p.add_argument("--echo-tokens-per-second", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grace-seconds", type=float, default=10.0)
    p.add_argument("--max-message-bytes", type=int, default=4 << 20)
    p.add_argument("--arena", type=Path, help="CPU domain arena file (request state and canaries)")
    p.add_argument("--arena-bytes", type=int, default=16 << 20)
    p.add_argument("--canary-file", type=Path, help="record canary hashes here at start")
    p.add_argument("--scrub", choices=SCRUB_MODES, default="request", help="when request state is zeroed")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs in the domain")
    p.add_argument("--max-model-len", type=int, help="vllm: context per sequence (default: the model's)")
    p.add_argument("--isolation", choices=("dedicated", "shared"), default="dedicated",
                   help="shared: several opted-in tenants on this one engine")  # fmt: skip
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="callers' text may spell chat-template control tokens (default: text)")  # fmt: skip
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--attest-cert",
        type=Path,
        required=True,
        action="append",
        help="this tenant's worker attestation certificate (from the attestation CA); one per --tenant",
    )
    p.add_argument("--attest-key", type=Path, required=True, action="append",
                   help="its private key (signs evidence); one per --tenant")  # fmt: skip
    p.add_argument("--hpke-suite", choices=SUITES, default=SUITES[0],
                   help="how tenant and end-to-end keys are sealed to this worker")  # fmt: skip
    p.add_argument("--trusted-keys", type=Path, help="PEM public keys model bundles must be signed by")
    p.add_argument("--allow-unsigned", action="store_true", help="load unsigned models (with a warning)")
    p.add_argument("--bundle-signing-key", type=Path, help="development: sign the bundled model's conversion")
    a = p.parse_args(argv)
    logs.configure("worker", a.log_level)
    tenants: list[str] = a.tenant
    if len(set(tenants)) != len(tenants):
        p.error("a tenant is named twice")
    if len(tenants) != len(a.attest_cert) or len(tenants) != len(a.attest_key):
        p.error("each --tenant needs its own --attest-cert and --attest-key, in the same order")
    if len(tenants) > 1 and a.isolation != "shared":
        p.error("serving several tenants needs --isolation shared")
    if a.isolation == "shared" and a.scrub == "off":
        # Fail closed: state must never pass from one tenant's request to another's unzeroed.
        p.error('a shared worker zeroes state between tenants: --scrub "request" or "tenant-switch"')
    return WorkerSettings(
        tenant=tenants[0],
        others=tuple(zip(tenants[1:], a.attest_cert[1:], a.attest_key[1:], strict=True)),
        model=a.model,
        engine=a.engine,
        model_path=a.model_path,
        cache_dir=a.cache_dir,
        listen=a.listen,
        tls=WorkerTls(a.tls_cert, a.tls_key, a.client_ca, a.allowed_peer),
        limits=Limits(max_tokens=a.max_tokens, default_max_tokens=a.default_max_tokens),
        ready_file=a.ready_file,
        echo_tokens_per_second=a.echo_tokens_per_second,
        threads=a.threads,
        device=a.device,
        grace_seconds=a.grace_seconds,
        max_message_bytes=a.max_message_bytes,
        hpke_suite=a.hpke_suite,
        attest_cert=a.attest_cert[0],
        attest_key=a.attest_key[0],
        bundles=BundlePolicy(a.trusted_keys, not a.allow_unsigned, a.bundle_signing_key),
        arena=a.arena,
        arena_bytes=a.arena_bytes,
        canary_file=a.canary_file,
        scrub=a.scrub,
        tensor_parallel_size=a.tensor_parallel_size,
        max_model_len=a.max_model_len,
        isolation=a.isolation,
        allow_special_tokens=a.allow_special_tokens,
    )


def build_engine(settings: WorkerSettings) -> tuple[Engine, bytes]:
    """The engine, and the manifest that identifies its model (measured into the evidence)."""
    if settings.engine == "echo":
        from worker.engines.echo import EchoEngine

        return EchoEngine(settings.echo_tokens_per_second), b"echo"
    from serving.bundle import MANIFEST
    from worker.engines.models import resolve_model

    # Every model directory is checked against its signed bundle before it is loaded.
    model_dir = resolve_model(settings.model_path, settings.cache_dir, settings.bundles)
    manifest = model_dir / MANIFEST  # the bundle's digests of every file (checked just now)
    measured = manifest.read_bytes() if manifest.exists() else b"unsigned:" + str(model_dir).encode()
    if settings.allow_special_tokens:
        _log.warning("callers' text may spell this model's chat control tokens (allow_special_tokens)",
                     extra={"model": settings.model})  # fmt: skip
    if settings.engine == "vllm":
        from worker.engines.vllm import VllmEngine, VllmSettings

        vllm = VllmSettings(
            model_dir,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=settings.max_model_len,
            isolation=settings.isolation,
            scrub=settings.scrub,
            allow_special_tokens=settings.allow_special_tokens,
        )
        return VllmEngine(vllm, tenant=settings.tenant), measured
    from worker.engines.transformers import TransformersEngine

    engine = TransformersEngine(
        model_dir,
        threads=settings.threads,
        device=settings.device,
        scrub_kv=zeroes_kv_per_request(settings),
        allow_special_tokens=settings.allow_special_tokens,
    )
    return engine, measured


def zeroes_kv_per_request(settings: WorkerSettings) -> bool:
    """TransformersEngine zeroes a request's KV cache when it ends in "request" mode, and always on a
    shared worker: it runs one request at a time, so that is also what "tenant-switch" needs there."""
    return settings.scrub == "request" or settings.isolation == "shared"


def build_attestors(settings: WorkerSettings, manifest: bytes) -> dict[str, WorkerAttestor]:
    """One attestor per tenant served: its own attestation key, HPKE key and released keys. The
    configuration they measure is the same, and names the isolation level and every tenant."""
    # What the configuration measurement covers: everything that shapes answers.
    measured: dict[str, object] = {
        "tenant": settings.tenant, "model": settings.model, "engine": settings.engine,
        "model_path": settings.model_path, "max_tokens": settings.limits.max_tokens,
        "default_max_tokens": settings.limits.default_max_tokens, "device": settings.device,
        "scrub": settings.scrub, "isolation": settings.isolation, "hpke_suite": settings.hpke_suite,
        "allow_special_tokens": settings.allow_special_tokens,
    }  # fmt: skip
    if settings.isolation == "shared":
        del measured["tenant"]
        measured["tenants"] = sorted(settings.tenants)
    if settings.attest_cert is None or settings.attest_key is None:
        raise ValueError("a worker needs its attestation certificate and key (--attest-cert/--attest-key)")
    identities = ((settings.tenant, settings.attest_cert, settings.attest_key), *settings.others)
    out = {}
    for tenant, cert, key in identities:
        out[tenant] = WorkerAttestor(
            tenant=tenant, model=settings.model, settings=measured, model_manifest=manifest,
            attest_key=key, attest_cert=cert, suite=settings.hpke_suite, nvidia=settings.device != "cpu",
            isolation=settings.isolation, tenants=tuple(sorted(settings.tenants)),
        )  # fmt: skip
    return out


async def serve(settings: WorkerSettings) -> None:
    # Until the engine is loaded there is nothing to drain: SIGTERM keeps its default (exit now).
    engine, manifest = await asyncio.to_thread(build_engine, settings)
    attestors = build_attestors(settings, manifest)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    state, cuda_canaries = _domain_memory(settings)
    first = attestors.pop(settings.tenant)
    service = WorkerService(settings.tenant, settings.model, engine, settings.limits, first, state,
                            others=attestors, isolation=settings.isolation)  # fmt: skip
    server, port, health = await create_server(
        service, settings.listen, settings.tls, max_message_bytes=settings.max_message_bytes
    )
    await server.start()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    if settings.ready_file is not None:
        tenants = list(settings.tenants)
        _write_ready(settings.ready_file, {"port": port, "pid": os.getpid(), "tenant": tenants[0],
                                           "tenants": tenants})  # fmt: skip
    _log.info("worker ready", extra={"tenant": ",".join(settings.tenants), "model": settings.model,
                                     "port": port, "isolation": settings.isolation})  # fmt: skip
    await stopping.wait()
    _log.info("worker stopping", extra={"tenant": settings.tenant})
    await health.enter_graceful_shutdown()
    await server.stop(settings.grace_seconds)
    await engine.close()
    del cuda_canaries  # held until here on purpose: the scrubber must not find them later


def _domain_memory(settings: WorkerSettings) -> tuple[RequestState | None, object]:
    """Open the domain's arena and write this worker's canaries (hashes go to the canary file)."""
    state = None
    if settings.arena is not None:
        arena = Arena(settings.arena, settings.arena_bytes)
        if settings.canary_file is not None:
            arena.write_canaries(settings.canary_file)
        state = RequestState(arena, settings.scrub)
    cuda = None
    if settings.device.startswith("cuda") and settings.canary_file is not None:
        # Its own record (the launcher's scrub of the GPU reads this one, of the arena the other).
        cuda = write_cuda_canaries(16, settings.canary_file.with_suffix(".cuda.json"))
    return state, cuda


def _write_ready(path: Path, info: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)
    settings = parse_args(argv)
    try:
        asyncio.run(serve(settings))
    except Exception:
        _log.exception("worker failed", extra={"tenant": settings.tenant})
        return 1
    return 0
