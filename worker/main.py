"""Worker process entry point: `python -m worker --settings FILE` (started by `airlock up`).

Everything the worker runs with is in its settings file (`serving.settings.WorkerSettings`, JSON),
written by the launcher or, on Kubernetes, given from a ConfigMap; the flags are the process's own:
where it reports readiness and how much it logs. Nothing is read from the environment except what
the launcher put there for the isolation domain (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2

from serving import logs
from serving.settings import SettingsError, WorkerSettings
from worker.attestation import WorkerAttestor
from worker.engine import Engine
from worker.engines.models import BundlePolicy
from worker.isolation.arena import Arena, RequestState, write_cuda_canaries
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    p.add_argument("--settings", type=Path, required=True, help="the worker's settings file (JSON)")
    p.add_argument("--ready-file", type=Path, help="written (port, pid, tenants) once serving")
    p.add_argument("--log-level", default="info")
    return p


def tls_of(settings: WorkerSettings) -> WorkerTls:
    t = settings.tls
    return WorkerTls(t.cert, t.key, t.client_ca, t.allowed_peer)


def bundle_policy(settings: WorkerSettings) -> BundlePolicy:
    b = settings.bundles
    return BundlePolicy(b.trusted_keys, b.require_signed, b.signing_key)


def build_engine(settings: WorkerSettings) -> tuple[Engine, bytes]:
    """The engine, and the manifest that identifies its model (measured into the evidence)."""
    if settings.engine == "echo":
        from worker.engines.echo import EchoEngine

        return EchoEngine(settings.echo_tokens_per_second), b"echo"
    from serving.bundle import MANIFEST
    from worker.engines.models import resolve_model

    # Every model directory is checked against its signed bundle before it is loaded.
    model_dir = resolve_model(settings.model_path, settings.cache_dir, bundle_policy(settings), settings.s3)
    manifest = model_dir / MANIFEST  # the bundle's digests of every file (checked just now)
    measured = manifest.read_bytes() if manifest.exists() else b"unsigned:" + str(model_dir).encode()
    if settings.allow_special_tokens:
        _log.warning("callers' text may spell this model's chat control tokens (allow_special_tokens)",
                     extra={"model": settings.model})  # fmt: skip
    if settings.engine == "vllm":
        from worker.engines.vllm import VllmEngine, VllmSettings

        vllm = VllmSettings(
            model_dir,
            tensor_parallel_size=settings.domain.tensor_parallel_size,
            max_model_len=settings.max_model_len,
            isolation=settings.isolation,
            scrub=settings.domain.scrub,
            allow_special_tokens=settings.allow_special_tokens,
        )
        return VllmEngine(vllm, tenant=settings.tenant), measured
    from worker.engines.transformers import TransformersEngine

    engine = TransformersEngine(
        model_dir,
        threads=settings.threads,
        device=settings.domain.device,
        scrub_kv=zeroes_kv_per_request(settings),
        allow_special_tokens=settings.allow_special_tokens,
    )
    return engine, measured


def zeroes_kv_per_request(settings: WorkerSettings) -> bool:
    """TransformersEngine zeroes a request's KV cache when it ends in "request" mode, and always on a
    shared worker: it runs one request at a time, so that is also what "tenant-switch" needs there."""
    return settings.domain.scrub == "request" or settings.isolation == "shared"


def build_attestors(settings: WorkerSettings, manifest: bytes) -> dict[str, WorkerAttestor]:
    """One attestor per tenant served: its own attestation key, HPKE key and released keys. The
    configuration they measure is the same, and names the isolation level and every tenant."""
    # What the configuration measurement covers: everything that shapes answers.
    measured: dict[str, object] = {
        "tenant": settings.tenant, "model": settings.model, "engine": settings.engine,
        "model_path": settings.model_path, "max_tokens": settings.limits.max_tokens,
        "default_max_tokens": settings.limits.default_max_tokens, "device": settings.domain.device,
        "scrub": settings.domain.scrub, "isolation": settings.isolation, "hpke_suite": settings.hpke_suite,
        "allow_special_tokens": settings.allow_special_tokens,
    }  # fmt: skip
    tenants = tuple(sorted(settings.tenant_names))
    if settings.isolation == "shared":
        del measured["tenant"]
        measured["tenants"] = list(tenants)
    out = {}
    for t in settings.tenants:
        out[t.name] = WorkerAttestor(
            tenant=t.name, model=settings.model, settings=measured, model_manifest=manifest,
            attest_key=t.attest_key, attest_cert=t.attest_cert, suite=settings.hpke_suite,
            nvidia=settings.domain.device != "cpu", isolation=settings.isolation, tenants=tenants,
        )  # fmt: skip
    return out


async def serve(settings: WorkerSettings, ready_file: Path | None = None) -> None:
    # Until the engine is loaded there is nothing to drain: SIGTERM keeps its default (exit now).
    engine, manifest = await asyncio.to_thread(build_engine, settings)
    attestors = build_attestors(settings, manifest)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    state, cuda_canaries = _domain_memory(settings)
    first = attestors.pop(settings.tenant)
    service = WorkerService(settings.tenant, settings.model, engine, settings.limits.limits(), first, state,
                            others=attestors, isolation=settings.isolation,
                            max_message_bytes=settings.limits.max_message_bytes)  # fmt: skip
    server, port, health = await create_server(
        service, settings.listen, tls_of(settings), max_message_bytes=settings.limits.max_message_bytes
    )
    await server.start()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    tenants = list(settings.tenant_names)
    if ready_file is not None:
        _write_ready(ready_file, {"port": port, "pid": os.getpid(), "tenant": tenants[0], "tenants": tenants})
    _log.info("worker ready", extra={"tenant": ",".join(tenants), "model": settings.model,
                                     "port": port, "isolation": settings.isolation})  # fmt: skip
    await stopping.wait()
    _log.info("worker stopping", extra={"tenant": settings.tenant})
    await health.enter_graceful_shutdown()
    service.drain()  # channels take no new request and end once theirs are answered
    await server.stop(settings.grace_seconds)
    await engine.close()
    del cuda_canaries  # held until here on purpose: the scrubber must not find them later


def _domain_memory(settings: WorkerSettings) -> tuple[RequestState | None, object]:
    """Open the domain's arena and write this worker's canaries (hashes go to the canary file)."""
    domain, state = settings.domain, None
    if domain.arena is not None:
        arena = Arena(domain.arena, domain.arena_bytes)
        if domain.canary_file is not None:
            arena.write_canaries(domain.canary_file)
        state = RequestState(arena, domain.scrub)
    cuda = None
    if domain.device.startswith("cuda") and domain.canary_file is not None:
        # Its own record (the launcher's scrub of the GPU reads this one, of the arena the other).
        cuda = write_cuda_canaries(16, domain.canary_file.with_suffix(".cuda.json"))
    return state, cuda


def _write_ready(path: Path, info: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)
    args = build_parser().parse_args(argv)
    logs.configure("worker", args.log_level)
    try:
        settings = WorkerSettings.load(args.settings)
    except SettingsError as exc:
        print(f"python -m worker: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, args.ready_file))
    except Exception:
        _log.exception("worker failed", extra={"tenant": settings.tenant})
        return 1
    return 0
