"""Gateway process entry point: `python -m gateway --config FILE --route ...` (started by `airlock up`).

The launcher starts the workers first and passes their addresses as routes; the gateway writes a
ready file once it serves, and on SIGTERM stops taking calls and lets in-flight ones finish within
the configured grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from airlock.attestation import AttestationPolicy
from gateway import config as config_mod
from gateway.admin import AdminService, AdminSocketError, create_admin_server, remove_socket
from gateway.admission import Admission
from gateway.archive import HEALTH_SERVICE as ARCHIVE_HEALTH
from gateway.archive import Archiver
from gateway.audit import AuditLog, load_signing_key
from gateway.auth.guard import CallGuard
from gateway.auth.identity import JwtVerifier, ServiceIdentity
from gateway.auth.lockout import Lockout
from gateway.call import Calls
from gateway.group import (
    LEAD,
    Group,
    GroupError,
    Place,
    admin_socket_of,
    metrics_listen_of,
    parse_place,
    watch_lead,
)
from gateway.http.app import HttpDoor, HttpLimits
from gateway.http.server import HttpServer
from gateway.keys import KeystoreError, open_keystore
from gateway.live import LiveGateway, Ports
from gateway.metrics import Metrics
from gateway.policy.authz import Authorizer
from gateway.policy.rules import PolicyError
from gateway.quota import MemoryQuotaStore, QuotaLimits, QuotaStore, RedisQuotaStore
from gateway.routing import tenant_health_name
from gateway.sealing import GatewaySealing
from gateway.server import (
    ClientTls,
    InferenceService,
    Pipeline,
    Route,
    Router,
    ServerTls,
    create_server,
    update_health,
)
from gateway.telemetry import TelemetryUnavailableError, make_tracer
from gateway.watching import watch_directory
from serving import logs
from serving.s3 import StorageError

_log = logging.getLogger("airlock.gateway")


def parse_route(text: str) -> Route:
    """TENANT/MODEL/ENGINE=HOST:PORT, or TENANT/MODEL/ENGINE/shared=HOST:PORT for a shared worker"""
    left, sep, address = text.partition("=")
    parts = left.split("/")
    shared = len(parts) == 4 and parts[3] == "shared"
    if not sep or len(parts) not in (3, 4) or (len(parts) == 4 and not shared) or not address:
        raise argparse.ArgumentTypeError(
            f"route must be TENANT/MODEL/ENGINE[/shared]=HOST:PORT, got {text!r}"
        )
    return Route(parts[0], parts[1], parts[2], address, shared=shared)


def format_route(route: Route) -> str:
    """A route as `--route` takes it (the inverse of `parse_route`)."""
    shared = "/shared" if route.shared else ""
    return f"{route.tenant}/{route.model}/{route.engine}{shared}={route.address}"


@dataclass(frozen=True)
class Gateway:
    """The wired parts of one gateway process."""

    authorizer: Authorizer
    verifier: JwtVerifier
    metrics: Metrics
    audit: AuditLog
    router: Router
    server: grpc.aio.Server
    health: Any
    port: int
    mtls_port: int | None
    admission: Admission
    sealing: GatewaySealing
    lockout: Lockout
    tracer_provider: Any = None
    http: HttpServer | None = None  # the OpenAI-compatible door; None when [http] listen is ""
    archiver: Archiver | None = None  # the audit trail's WORM copy (audit.archive.url)


class MissingFileError(Exception):
    """A file the configuration names (or the development PKI default) is not there."""


def check_files(cfg: config_mod.Config) -> config_mod.TlsFiles:
    """Every certificate and key file the gateway reads, checked before anything starts: the gateway
    uses them as given and never makes one (no CA key ever needs to be on its host)."""
    tls = cfg.tls_files
    wanted = {f"tls.{name}": getattr(tls, name) for name in ("cert", "key", "worker_ca", "service_ca",
                                                             "attestation_ca")}  # fmt: skip
    wanted["audit.signing_key"] = cfg.audit_signing_key
    for i, issuer in enumerate(cfg.auth.issuers):
        wanted[f"auth.issuers[{i}].jwks_file"] = cfg.jwks_file(issuer)
    for key, path in wanted.items():
        if not path.is_file():
            dev = path.is_relative_to(cfg.dev_pki_dir)
            hint = ("the development PKI is made by `airlock up`; a production gateway sets this key"
                    if dev else "check the path")  # fmt: skip
            raise MissingFileError(f"{key}: {path} is not a file ({hint})")
    return tls


def build(
    cfg: config_mod.Config,
    routes: list[Route],
    listen: str,
    mtls_listen: str,
    http_listen: str | None = None,
    place: Place = LEAD,
) -> Gateway:
    """Wire the gateway from its configuration: certificates, policy, identities, guard, server.
    `place`: this process among the gateway's (gateway/group.py): its share of the quotas, shared
    ports; the lead alone ships the audit trail to the archive."""
    tls_files = check_files(cfg)
    metrics = Metrics()
    metrics.process.labels(str(place.index), str(place.count)).set(1)
    audit = AuditLog(cfg.audit_path, config=cfg.audit, signing_key=load_signing_key(cfg.audit_signing_key))
    archiver = build_archiver(cfg, audit, metrics) if place.lead else None
    authorizer = Authorizer.from_directory(
        cfg.policy_dir, required_tenants=[r.tenant for r in routes], metrics=metrics, audit=audit
    )

    def may_speak_for(issuer: str, tenant: str) -> bool:
        settings = authorizer.policy.tenants.get(tenant)  # the policy in service, reloaded with it
        return settings is not None and issuer in settings.issuers

    jwks = {i.issuer: cfg.jwks_file(i) for i in cfg.auth.issuers}
    verifier = JwtVerifier(
        cfg.auth, jwks, may_speak_for, known_tenant=lambda tenant: tenant in authorizer.policy.tenants
    )
    tls = ClientTls(ca=tls_files.worker_ca, cert=tls_files.cert, key=tls_files.key)
    router = Router(routes, tls, may_share=shared_opt_in(authorizer), audit=audit,
                    max_message_bytes=cfg.gateway.max_message_bytes)  # fmt: skip
    admission, tracer_provider = build_admission(cfg, authorizer, metrics, audit, place)
    attestation_ca = tls_files.attestation_ca.read_bytes()
    sealing = build_sealing(cfg, authorizer, audit, attestation_ca, {r.tenant for r in routes})
    pipeline = Pipeline(router, authorizer, admission=admission, sealing=sealing, audit=audit)
    service = InferenceService(pipeline)
    calls = Calls(
        router, cfg.gateway.limits, quota_for=admission.limits_for, refused=admission.refused,
        may_use=lambda call, model: any(
            authorizer.decide(call.principal.policy_subject, call.tenant, f"model:{model}", act).allowed
            for act in ("generate", "stream")
        ),
    )  # fmt: skip
    lockout = Lockout(cfg.lockout)
    guard = CallGuard(
        verifier,
        ServiceIdentity(cfg.auth.mtls.trust_domain),
        authorizer,
        lockout,
        calls,
        gate=admission.gate,
        metrics=metrics,
        audit=audit,
    )
    server_tls = ServerTls(tls_files.cert, tls_files.key, tls_files.service_ca)
    server, port, mtls_port, health = create_server(
        service,
        guard,
        listen,
        tls=server_tls,
        max_message_bytes=cfg.gateway.max_message_bytes,
        mtls_listen=mtls_listen,
        reuse_port=place.count > 1,
    )
    http = build_http(
        cfg, guard, pipeline, cfg.http.listen if http_listen is None else http_listen, tls_files,
        reuse_port=place.count > 1,
    )  # fmt: skip
    return Gateway(
        authorizer, verifier, metrics, audit, router, server, health, port, mtls_port,
        admission, sealing, lockout, tracer_provider, http, archiver,
    )  # fmt: skip


def build_http(
    cfg: config_mod.Config,
    guard: CallGuard,
    pipeline: Pipeline,
    listen: str,
    tls: config_mod.TlsFiles,
    reuse_port: bool = False,
) -> HttpServer | None:
    """The OpenAI-compatible door (gateway/http/) on the same guard and pipeline, bound; None when
    disabled. Its certificate is the gRPC door's."""
    if not listen:
        return None
    http = dataclasses.replace(cfg.http, listen=listen)
    limits = HttpLimits(max_body_bytes=cfg.gateway.max_message_bytes, max_header_bytes=http.max_header_bytes,
                        body_timeout=http.body_timeout_seconds,
                        timeout=http.timeout_seconds, max_streams=http.max_streams)  # fmt: skip
    return HttpServer.bind(HttpDoor(guard, pipeline, limits), http, cert=tls.cert, key=tls.key,
                           grace_seconds=cfg.gateway.grace_seconds, reuse_port=reuse_port)  # fmt: skip


def build_archiver(cfg: config_mod.Config, audit: AuditLog, metrics: Metrics) -> Archiver | None:
    """The audit archive when `audit.archive.url` is set: woken by the log, never in its way."""
    if not cfg.audit.archive.url or cfg.s3 is None or audit.path is None:
        return None

    archiver = Archiver(audit.path, cfg.audit.archive, cfg.s3, registry=metrics.registry)
    audit.on_change = archiver.wake
    return archiver


def shared_opt_in(authorizer: Authorizer) -> Callable[[str], bool]:
    """Whether the policy in service (reloaded with it) opts a tenant in to shared workers."""

    def may_share(tenant: str) -> bool:
        settings = authorizer.policy.tenants.get(tenant)
        return settings is not None and settings.isolation == "shared"

    return may_share


def build_sealing(
    cfg: config_mod.Config, authorizer: Authorizer, audit: AuditLog, ca_pem: bytes, tenants: set[str]
) -> GatewaySealing:
    """The tenant keystore and key release; refuses to start when a served tenant has no key (fail
    closed: its prompts could not be sealed)."""
    keystore = open_keystore(cfg.keys, cfg.state_dir)
    missing = sorted(
        t for t in tenants if not any(k.tenant == t and k.state == "active" for k in keystore.list())
    )
    if missing:
        raise KeystoreError(
            f"no active key for tenant(s) {', '.join(missing)}; "
            "create them with `airlock keys create --tenant NAME`"
        )

    suites = (cfg.sealing.hpke_suite,)  # keys go only over the suite the deployment chose
    default = AttestationPolicy()
    # tenant -> (the policy's own attestation policy, it with our suites): rebuilt only when a
    # policy reload gives the tenant another one, not on every request
    pinned: dict[str, tuple[AttestationPolicy, AttestationPolicy]] = {}

    def policy_for(tenant: str) -> AttestationPolicy:
        settings = authorizer.policy.tenants.get(tenant)  # reloaded with the policy
        policy = settings.attestation if settings is not None else default
        hit = pinned.get(tenant)
        if hit is None or hit[0] is not policy:
            hit = pinned[tenant] = (policy, dataclasses.replace(policy, suites=suites))
        return hit[1]

    return GatewaySealing(
        keystore, ca_pem=ca_pem, policy_for=policy_for, audit=audit,
        reattest_seconds=cfg.sealing.reattest_seconds, may_share=shared_opt_in(authorizer),
    )  # fmt: skip


def build_admission(
    cfg: config_mod.Config, authorizer: Authorizer, metrics: Metrics, audit: AuditLog, place: Place = LEAD
) -> tuple[Admission, Any]:
    """Quotas from the policy in service (reloaded with it), their state store, and tracing; this
    process's share of each budget in memory (all of it in a gateway of one process)."""
    store: QuotaStore = MemoryQuotaStore(share=place.share)
    if cfg.quota.backend == "redis":
        store = RedisQuotaStore(
            cfg.quota.redis_url, key_prefix=cfg.quota.key_prefix, lease_seconds=cfg.quota.lease_seconds
        )

    def limits_for(tenant: str) -> QuotaLimits | None:
        settings = authorizer.policy.tenants.get(tenant)
        return settings.quota if settings is not None else None

    tracer, provider = make_tracer(cfg.telemetry)
    admission = Admission(store, limits_for, metrics=metrics, audit=audit, tracer=tracer, share=place.share)
    return admission, provider


async def watch_jwks(
    verifier: JwtVerifier, metrics: Metrics, stop: asyncio.Event, audit: AuditLog | None = None
) -> None:
    """Reload a JWKS file when it changes (key rotation without a restart). Whatever a file makes the
    loader raise is a rejection (the old keys stay), and the watch survives anything."""
    files = {path.resolve() for path in verifier.jwks_files.values()}

    async def changed(paths: set[Path] | None, directory: Path) -> None:
        targets = {p.resolve() for p in paths} if paths is not None else files
        for path in verifier.jwks_files.values():
            resolved = path.resolve()
            if resolved in targets and resolved.parent == directory and resolved.exists():
                try:
                    ok = verifier.reload(path)
                except Exception as exc:
                    ok = False
                    _log.error("JWKS reload rejected; the old keys stay in use", exc_info=exc)
                result = "accepted" if ok else "rejected"
                metrics.jwks_reloads.labels(result).inc()
                if audit is not None:
                    audit.record("jwks_reload", result=result, file=str(path))

    await asyncio.gather(*(
        watch_directory(
            directory, functools.partial(changed, directory=directory), stop, name="JWKS",
            on_error=metrics.watch_errors.labels("jwks").inc, watch_filter=lambda p: p.resolve() in files,
        )
        for directory in {path.parent for path in files}
    ))  # fmt: skip


async def serve(
    cfg: config_mod.Config,
    routes: list[Route],
    listen: str,
    mtls_listen: str,
    ready_file: Path | None,
    admin_socket: Path | None = None,
    http_listen: str | None = None,
    metrics_listen: str | None = None,
    place: Place = LEAD,
    relaunch: list[str] | None = None,
) -> None:
    """Serve until SIGTERM, then drain. `place`: this process among the gateway's; the lead of
    several starts the others with `relaunch` (its --config, --state-dir and --log-level)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    lead_pid = os.getppid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    gw = build(cfg, routes, listen, mtls_listen, http_listen, place)
    metrics_port = None
    metrics_listen = cfg.gateway.metrics_listen if metrics_listen is None else metrics_listen
    if metrics_listen:
        host, _, mport = metrics_listen.rpartition(":")
        metrics_port = gw.metrics.serve(host, int(mport))
    await update_health(gw.health, gw.router)  # NOT_SERVING until the workers say they are ready
    published = set(gw.router.tenants)

    async def readiness_changed() -> None:
        nonlocal published
        if not stopping.is_set():  # draining: stay NOT_SERVING
            await update_health(gw.health, gw.router)
            for gone in published - set(gw.router.tenants):  # a tenant whose routes were removed
                await gw.health.set(tenant_health_name(gone), health_pb2.HealthCheckResponse.NOT_SERVING)
            published = set(gw.router.tenants)

    group = None
    if place.lead and place.count > 1:
        group = _group(cfg, gw, place.count, (listen, mtls_listen, http_listen, metrics_listen), admin_socket,
                       relaunch or [])  # fmt: skip

    admin = None
    if admin_socket is not None:
        live = LiveGateway(
            router=gw.router, authorizer=gw.authorizer, sealing=gw.sealing, lockout=gw.lockout,
            metrics=gw.metrics, audit=gw.audit, ports=Ports(gw.port, gw.mtls_port, metrics_port),
            grace_seconds=cfg.gateway.grace_seconds, publish=readiness_changed,
        )  # fmt: skip
        admin = create_admin_server(
            admin_socket, AdminService(gw.lockout, gw.audit, live, index=place.index, group=group)
        )

    keystore_errors = gw.metrics.watch_errors.labels("keystore").inc
    watchers = [
        asyncio.create_task(gw.authorizer.watch(stopping)),
        asyncio.create_task(watch_jwks(gw.verifier, gw.metrics, stopping, gw.audit)),
        asyncio.create_task(gw.router.watch(stopping, readiness_changed)),
        asyncio.create_task(gw.sealing.watch(stopping, on_error=keystore_errors)),
    ]
    if not place.lead:
        watchers.append(asyncio.create_task(watch_lead(lead_pid, stopping)))

    def audit_failed(_why: str) -> None:  # may run on a policy-reload thread
        asyncio.run_coroutine_threadsafe(_not_serving(gw), loop)

    gw.audit.on_failure = audit_failed
    if gw.archiver is not None:
        # Its own health service: NOT_SERVING while the store fails or the backlog is over its
        # bound. Calls are never refused for it (the local trail stays the record).
        await gw.health.set(ARCHIVE_HEALTH, health_pb2.HealthCheckResponse.SERVING)

        def archive_health(ok: bool) -> None:  # the archiver's thread
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            asyncio.run_coroutine_threadsafe(gw.health.set(ARCHIVE_HEALTH, status), loop)

        gw.archiver.on_health = archive_health
        gw.archiver.start()
    await gw.server.start()
    if gw.http is not None:
        gw.http.start()
    if admin is not None:
        await admin.start()
    failed: GroupError | None = None
    if group is not None:
        try:
            await group.start()
        except GroupError as exc:
            failed = exc
            stopping.set()
    if ready_file is not None and failed is None:
        tmp = ready_file.with_suffix(".tmp")
        info = {"port": gw.port, "mtls_port": gw.mtls_port, "metrics_port": metrics_port, "pid": os.getpid(),
                "admin_socket": str(admin_socket) if admin is not None else None,
                "http_port": gw.http.port if gw.http is not None else None,
                "gateway_process": place.index,
                "processes": group.describe() if group is not None else []}  # fmt: skip
        tmp.write_text(json.dumps(info))
        tmp.replace(ready_file)
    if failed is None:
        _log.info(
            "gateway ready",
            extra={"port": gw.port, "mtls_port": gw.mtls_port, "gateway_process": place.index},
        )
    await stopping.wait()
    _log.info(
        "gateway draining", extra={"elapsed_s": cfg.gateway.grace_seconds, "gateway_process": place.index}
    )
    await gw.health.enter_graceful_shutdown()
    others = [group.stop(cfg.gateway.grace_seconds)] if group is not None and failed is None else []
    await asyncio.gather(
        gw.server.stop(cfg.gateway.grace_seconds), *([gw.http.stop()] if gw.http is not None else []), *others
    )
    if admin is not None and admin_socket is not None:
        await admin.stop(None)
        remove_socket(admin_socket)
    await asyncio.gather(*watchers, return_exceptions=True)
    await gw.router.close()
    await gw.admission.store.close()
    if gw.tracer_provider is not None:
        gw.tracer_provider.shutdown()
    gw.audit.close()
    if gw.archiver is not None:
        gw.archiver.on_health = None  # the loop is closing
        await asyncio.to_thread(gw.archiver.close)  # ships the closing signature, if the store lets it
    if failed is not None:
        raise failed


def _group(
    cfg: config_mod.Config, gw: Gateway, count: int, listens: tuple[str, str, str | None, str],
    admin_socket: Path | None, relaunch: list[str],
) -> Group:  # fmt: skip
    """The lead's other processes: on the ports it bound (`listens`: what it was told to bind: the
    TLS, mTLS, HTTP and metrics addresses), each with its own metrics port and admin socket; a
    restart is counted and audited."""
    listen, mtls_listen, http_listen, metrics_listen = listens
    http = cfg.http.listen if http_listen is None else http_listen

    def bound(address: str, port: int | None) -> str:
        """`address`'s host on the port the lead bound there; "" (off) when it bound none."""
        return f"{address.rpartition(':')[0]}:{port}" if port else ""

    def argv(index: int, ready_file: Path, routes: list[Route]) -> list[str]:
        args = ["-m", "gateway", "--process", f"{index}/{count}", *relaunch, "--ready-file", str(ready_file),
                "--listen", bound(listen, gw.port),
                "--mtls-listen", bound(mtls_listen, gw.mtls_port),
                "--http-listen", bound(http, gw.http.port if gw.http is not None else None),
                "--metrics-listen", metrics_listen_of(metrics_listen, index),
                "--admin-socket", str(admin_socket_of(admin_socket, index)) if admin_socket else "",
                ]  # fmt: skip
        return args + [arg for route in routes for arg in ("--route", format_route(route))]

    def restarted(index: int, returncode: int | None) -> None:
        gw.metrics.process_restarts.inc()
        gw.audit.record("gateway_process_restarted", process=index, returncode=returncode)

    return Group(count, argv, lambda: list(gw.router.routes), on_restart=restarted)


async def _not_serving(gw: Gateway) -> None:
    """Every call is refused while the audit log is down: say so to health checks and balancers."""
    await gw.health.enter_graceful_shutdown()  # every service name, and no later readiness flips it back


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--config", type=Path)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--route", type=parse_route, action="append", default=[], required=True)
    p.add_argument("--listen", help="override gateway.listen (e.g. 127.0.0.1:0 in tests)")
    p.add_argument("--mtls-listen", help='override gateway.mtls_listen ("" disables it)')
    p.add_argument("--admin-socket", help='override gateway.admin_socket ("" disables it)')
    p.add_argument("--http-listen", help='override http.listen ("" disables the HTTP door)')
    p.add_argument("--metrics-listen", help='override gateway.metrics_listen ("" disables it)')
    p.add_argument("--ready-file", type=Path)
    p.add_argument("--log-level", default="info")
    p.add_argument("--process", help="I/N: process I of the gateway's N, started by its process 0")
    args = p.parse_args(argv)
    logs.configure("gateway", args.log_level)
    try:
        cfg = config_mod.load(args.config, state_dir=args.state_dir)
    except config_mod.ConfigError as exc:
        _log.error("bad configuration: %s", exc)
        return 2
    try:
        mtls = cfg.gateway.mtls_listen if args.mtls_listen is None else args.mtls_listen
        admin = cfg.admin_socket if args.admin_socket is None else args.admin_socket
        admin_path = Path(admin).absolute() if admin else None
        listen = args.listen or cfg.gateway.listen
        place = parse_place(args.process) if args.process else Place(0, cfg.gateway.processes)
        relaunch = ["--log-level", args.log_level, "--state-dir", str(cfg.state_dir)]
        relaunch += ["--config", str(args.config.absolute())] if args.config else []
        asyncio.run(serve(cfg, args.route, listen, mtls, args.ready_file, admin_path, args.http_listen,
                          args.metrics_listen, place, relaunch))  # fmt: skip
    except PolicyError as exc:
        _log.error("policy refused: %s", exc)
        return 2
    except KeystoreError as exc:
        _log.error("keystore refused: %s", exc)
        return 2
    except MissingFileError as exc:
        _log.error("configuration names a missing file: %s", exc)
        return 2
    except TelemetryUnavailableError as exc:
        _log.error("%s", exc)
        return 2
    except AdminSocketError as exc:
        _log.error("admin socket refused: %s", exc)
        return 2
    except GroupError as exc:
        _log.error("%s", exc)
        return 2
    except StorageError as exc:
        _log.error("audit archive refused: %s", exc)
        return 2
    except Exception:
        _log.exception("gateway failed")
        return 1
    return 0
