"""Start and stop a whole stack as processes: one worker per (tenant, model), then the gateway.

Tenants with `isolation = "shared"` have no workers of their own: every model they use gets one
shared worker (key `("shared", MODEL)`), serving all of them.

Each worker is started as `python -m worker --settings run/<worker>.settings.json`: the launcher
builds its `WorkerSettings` from the configuration, the domain and the dev PKI, and writes it there.

Used by `airlock up` and by the end-to-end tests. Children run in their own process groups with a
parent-death signal, so neither Ctrl-C nor a crash of the launcher leaves an orphan behind. While it
runs, the stack's run file (`run/stack.json`, control/runfile.py) says what it is doing; tenants are
added and removed while it serves by `control.reconcile`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.children import Child
from control.pki import DevPki, ensure_dev_pki, worker_attestation_cert
from control.preflight import PortError, check_ports
from control.runfile import RUN_FILE, process_alive, read, write_atomic
from control.supervisor import Domain, Supervisor, SupervisorMetrics
from gateway.archive import Archiver
from gateway.audit import AuditLog, load_signing_key
from gateway.config import ADMIN_SOCKET_NAME, MAX_UNIX_PATH_BYTES, Config, ModelConfig, TenantConfig
from gateway.config.isolation import SHARED, shared_models
from gateway.keys import ensure_tenant_keys, open_keystore
from gateway.routing import Route
from serving.settings import (
    BundleTrust,
    DomainSettings,
    RequestLimits,
    TenantIdentity,
    TlsFiles,
    WorkerSettings,
)

__all__ = ["Child", "Stack", "StackError"]

_PR_SET_PDEATHSIG = 1

# glibc hands large freed blocks back to the kernel and faults them in again on the next request:
# with megabyte payloads (sealed prompts, KV buffers) that costs more than the AES-GCM itself
# (bench/sealing.py measures 1 MiB sealing ~4x slower without this). Keep them in the process.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "134217728"}


TLS_KEYS = ("cert", "key", "worker_ca", "service_ca", "attestation_ca")


class StackError(Exception):
    """A part of the stack failed to start; the message says which and quotes its log."""


# The parent-death signal is set by a tiny exec shim, not by a preexec_fn: Python code between
# fork and exec can abort the child when another thread (the supervisor's, gRPC's, torch's) held
# malloc's or the loader's locks at fork time. The shim checks its parent is still the launcher
# (it may have died before prctl ran), then execs the real command; the setting survives exec.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Stack:
    def __init__(
        self,
        config: Config,
        *,
        run_dir: Path | None = None,
        listen: str | None = None,
        python: str = sys.executable,
        log_level: str = "info",
        mtls_listen: str | None = None,
        metrics_listen: str | None = None,
        events: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir or config.state_dir / "run"
        self.listen = listen or config.gateway.listen
        self.mtls_listen = mtls_listen
        self.metrics_listen = metrics_listen
        self.python = python
        self.log_level = log_level
        self.events = events  # one line for the operator per significant event (crash, restart, tenant)
        self.lock = threading.RLock()  # the workers and domains change under it (supervisor, reconcile)
        self.started_at = time.time()
        self.pki: DevPki | None = None
        self.workers: dict[tuple[str, str], Child] = {}
        self.gateway: Child | None = None
        # Isolation domains (CPU arenas) per worker, the settings each worker runs with (a restart
        # reads the same file again), and the supervisor that scrubs and restarts them.
        self.domains: dict[tuple[str, str], Domain] = {}
        self.settings: dict[tuple[str, str], WorkerSettings] = {}
        self.supervisor: Supervisor | None = None
        self.archiver: Archiver | None = None
        self.supervisor_metrics_port: int | None = None
        self.routes_in_service: list[Route] = []  # what the gateway was last told (or started with)

    @property
    def address(self) -> str:
        if self.gateway is None:
            raise StackError("the stack is not running")
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.gateway.port}"

    @property
    def mtls_address(self) -> str | None:
        """The service (mTLS) port's address; None when it is disabled."""
        if self.gateway is None:
            raise StackError("the stack is not running")
        port = self.gateway.info.get("mtls_port")
        return f"{self.listen.rsplit(':', 1)[0]}:{port}" if port else None

    @property
    def http_address(self) -> str | None:
        """The OpenAI-compatible HTTPS door's address; None when it is disabled."""
        if self.gateway is None:
            raise StackError("the stack is not running")
        port = self.gateway.info.get("http_port")
        return f"{self.listen.rsplit(':', 1)[0]}:{port}" if port else None

    @property
    def admin_socket(self) -> str | None:
        """The gateway's Admin socket (`airlock lockout`); None when it is disabled."""
        if self.gateway is None:
            raise StackError("the stack is not running")
        path = self.gateway.info.get("admin_socket")
        return str(path) if path else None

    def _admin_socket_args(self) -> list[str]:
        """A stack with its own run directory (tests, a second stack on one state directory) keeps
        its gateway's admin socket there too, unless the configuration names one."""
        default = self.config.state_dir / "run" / ADMIN_SOCKET_NAME
        if self.config.admin_socket != default or self.run_dir == default.parent:
            return []
        path = self.run_dir.absolute() / ADMIN_SOCKET_NAME
        return ["--admin-socket", str(path) if len(os.fsencode(str(path))) <= MAX_UNIX_PATH_BYTES else ""]

    @property
    def metrics_port(self) -> int | None:
        if self.gateway is None:
            raise StackError("the stack is not running")
        port = self.gateway.info.get("metrics_port")
        return int(port) if port else None

    def start(self, *, timeout: float = 600.0, progress: Callable[[str], None] = lambda _: None) -> None:
        try:
            self._start(timeout, progress)
        except BaseException:
            self.stop()
            raise

    @property
    def gateway_mtls_listen(self) -> str | None:
        """What the gateway's service port binds: the flag, else the configuration's (a listen
        override moves it to any port of the same host); None: the configuration's as it is."""
        if self.mtls_listen is not None:
            return self.mtls_listen
        if self.listen != self.config.gateway.listen and self.config.gateway.mtls_listen:
            return f"{self.listen.rsplit(':', 1)[0]}:0"  # tests, a second stack: same host, any port
        return None

    def ports(self) -> list[tuple[str, str]]:
        """Every (config key or flag, HOST:PORT) this stack binds, for the preflight check."""
        gateway, mtls = self.config.gateway, self.gateway_mtls_listen
        metrics = gateway.metrics_listen if self.metrics_listen is None else self.metrics_listen
        return [
            ("--listen" if self.listen != gateway.listen else "gateway.listen", self.listen),
            ("--mtls-listen" if self.mtls_listen is not None else "gateway.mtls_listen",
             gateway.mtls_listen if mtls is None else mtls),
            ("--metrics-listen" if self.metrics_listen is not None else "gateway.metrics_listen", metrics),
            ("supervisor.metrics_listen", self.config.supervisor.metrics_listen),
        ]  # fmt: skip

    def _start(self, timeout: float, progress: Callable[[str], None]) -> None:
        custom = [f"tls.{name}" for name in TLS_KEYS if name not in self.config.tls_files.dev]
        if custom:
            # Its workers' certificates come from the development CA, which a configured
            # tls.worker_ca would not trust: a production gateway is started on its own.
            raise StackError(
                f"`airlock up` runs a development stack on the PKI in {self.config.dev_pki_dir}; "
                f"{', '.join(custom)} configure a production gateway, started on its own "
                "(`python -m gateway`, docs/production.md)"
            )
        _, running = read(self.run_dir.parent) if self.run_dir.name == "run" else (None, None)
        if running is not None and running["pid"] != os.getpid() and process_alive(running["pid"]):
            raise StackError(
                f"a stack already runs from {self.run_dir.parent} (launcher pid {running['pid']}, gateway "
                f"{running.get('address')}): `airlock status` shows it, `airlock down` stops it"
            )
        try:  # before any model is loaded: a port in use is found in a second, by its key
            check_ports(self.ports())
        except PortError as exc:
            raise StackError(str(exc)) from None
        self.pki = pki = ensure_dev_pki(self.config.state_dir)
        # Development: every tenant gets a key on first start (production keys are made by operators).
        ensure_tenant_keys(open_keystore(self.config.keys, self.config.state_dir), list(self.config.tenants))
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.run_dir, 0o700)  # logs, ready files and the gateway's admin socket: owner only
        sup = self.config.supervisor
        # Beside the gateway's trail, chained and signed the same way (`airlock audit verify` checks both).
        audit = AuditLog(
            self.config.audit_path.with_name("supervisor.jsonl"), config=self.config.audit,
            signing_key=load_signing_key(self.config.audit_signing_key),
        )  # fmt: skip
        metrics = SupervisorMetrics()
        self.archiver = self._archiver(audit, metrics)
        self.supervisor = supervisor = Supervisor(self, sup, audit, metrics, notify=self._event)
        for key, (settings, domain) in self.worker_plan(pki).items():
            self.domains[key] = domain
            self._write_settings(key, settings)
            # Whatever an earlier worker left in the domain goes before this one gets it.
            scrubbed = supervisor.scrub(key, "start")
            if not scrubbed["verified"]:
                raise StackError(f"domain {domain.id} failed its scrub and stays out of service: "
                                 f"{scrubbed.get('reason')}")  # fmt: skip
            # Pinned to its domain: its GPUs (by UUID) only, or none for a CPU domain.
            self.workers[key] = self._spawn_worker(key)
        deadline = time.monotonic() + timeout
        self._wait_ready(list(self.workers.values()), deadline, progress)
        for key, child in self.workers.items():  # a restarted worker binds its first port again
            self._write_settings(key, replace(self.settings[key], listen=f"127.0.0.1:{child.port}"))
        self.routes_in_service = self.routes()
        routes = [
            f"--route={r.tenant}/{r.model}/{r.engine}{'/shared' if r.shared else ''}={r.address}"
            for r in self.routes_in_service
        ]
        gateway_args = ["-m", "gateway", "--listen", self.listen, "--state-dir", str(self.config.state_dir)]
        if self.gateway_mtls_listen is not None:
            gateway_args += ["--mtls-listen", self.gateway_mtls_listen]
        if self.metrics_listen is not None:
            gateway_args += ["--metrics-listen", self.metrics_listen]
        if self.listen != self.config.gateway.listen and self.config.http.listen:
            gateway_args += ["--http-listen", f"{self.listen.rsplit(':', 1)[0]}:0"]  # the HTTP door too
        gateway_args += self._admin_socket_args()
        if self.config.source != "<defaults>":
            gateway_args += ["--config", self.config.source]
        self.gateway = self._spawn("gateway", gateway_args + routes, {})
        self._wait_ready([self.gateway], deadline, progress)
        self._check_health(deadline)
        if sup.metrics_listen:
            host, _, port = sup.metrics_listen.rpartition(":")
            self.supervisor_metrics_port = supervisor.metrics.serve(host, int(port))
        supervisor.start()
        self.write_state()

    def _archiver(self, audit: AuditLog, metrics: SupervisorMetrics) -> Archiver | None:
        """The supervisor's trail goes to the audit archive too (gateway/archive.py), beside the gateway's."""
        archive, s3 = self.config.audit.archive, self.config.s3
        if not archive.url or s3 is None or audit.path is None:
            return None
        archiver = Archiver(audit.path, archive, s3, registry=metrics.registry)
        audit.on_change = archiver.wake
        archiver.start()
        return archiver

    def routes(self, config: Config | None = None) -> list[Route]:
        """The gateway's routes for `config` (this stack's): each tenant's models in its order (its
        first is its default), to the workers running for them."""
        config = config or self.config
        out = []
        for tenant in config.tenants.values():
            for model in tenant.models:
                shared = tenant.isolation == "shared"
                child = self.workers.get((SHARED, model) if shared else (tenant.name, model))
                if child is None or not child.info:
                    continue  # not started (yet): no route
                engine = config.models[model].engine
                out.append(Route(tenant.name, model, engine, f"127.0.0.1:{child.port}", shared=shared))
        return out

    @property
    def state_file(self) -> Path:
        return self.run_dir / RUN_FILE

    def _event(self, line: str) -> None:
        """A supervisor event: said to the operator, and the run file follows it."""
        self.events(line)
        self.write_state()

    def state(self) -> dict[str, Any]:
        """What the run file says: the launcher, the gateway and every worker."""
        gateway, supervisor, pki = self.gateway, self.supervisor, self.pki
        workers = []
        with self.lock:
            for key, child in self.workers.items():
                settings, domain = self.settings.get(key), self.domains.get(key)
                workers.append({
                    "name": child.name,
                    "tenants": [t.name for t in settings.tenants] if settings else [key[0]],
                    "model": key[1],
                    "engine": settings.engine if settings else "",
                    "domain": domain.id if domain else "",
                    "devices": list(domain.devices) if domain else [],
                    "pid": child.process.pid,
                    "port": child.info.get("port"),
                    "started": child.since,
                    "restarts": supervisor.restarts.get(key, 0) if supervisor else 0,
                    "state": supervisor.state(key) if supervisor else "running",
                    "log": str(child.log),
                })  # fmt: skip
        host = self.listen.rsplit(":", 1)[0]
        sup_host = self.config.supervisor.metrics_listen.rsplit(":", 1)[0]
        metrics = f"http://{host}:{self.metrics_port}/metrics" if gateway and self.metrics_port else None
        sup_port = self.supervisor_metrics_port
        return {
            "pid": os.getpid(),
            "started": self.started_at,
            "updated": time.time(),
            "config": self.config.source,
            "state_dir": str(self.config.state_dir),
            "run_dir": str(self.run_dir),
            "policy_dir": str(self.config.policy_dir),
            "address": self.address if gateway else None,
            "mtls_address": self.mtls_address if gateway else None,
            "metrics_url": metrics,
            "supervisor_metrics_url": f"http://{sup_host}:{sup_port}/metrics" if sup_port else None,
            "ca": str(pki.ca_cert) if pki else None,
            "admin_socket": self.admin_socket if gateway else None,
            "audit": str(self.config.audit_path),
            "gateway": (
                {"pid": gateway.process.pid, "started": gateway.since, "log": str(gateway.log)}
                if gateway
                else None
            ),
            "tenants": list(self.config.tenants),
            "workers": workers,
        }

    def write_state(self) -> None:
        """Write the run file (atomically); only once the gateway serves, until the stack stops."""
        if self.gateway is None or self.supervisor is None:
            return
        try:
            write_atomic(self.state_file, self.state())
        except OSError as exc:  # a full disk must not take the stack down; `airlock status` says less
            self.events(f"cannot write the run file {self.state_file}: {exc.strerror}")

    def worker_plan(
        self, pki: DevPki, config: Config | None = None
    ) -> dict[tuple[str, str], tuple[WorkerSettings, Domain]]:
        """Every worker `config` (this stack's) needs: one per (dedicated tenant, model), one per
        shared model."""
        config = config or self.config
        plan = {}
        for tenant in config.tenants.values():
            if tenant.isolation == "dedicated":
                for model in tenant.models:
                    plan[(tenant.name, model)] = self.worker_settings(pki, tenant, config.models[model])
        for model, tenants in shared_models(config).items():
            plan[(SHARED, model)] = self.shared_worker_settings(
                pki, tenants, config.models[model], config.shared_domains.get(model, ())
            )
        return plan

    def worker_settings(
        self, pki: DevPki, tenant: TenantConfig, model: ModelConfig
    ) -> tuple[WorkerSettings, Domain]:
        """The settings of one (tenant, model) worker, and the isolation domain it is pinned to."""
        devices = tenant.domains.get(model.name, ())
        domain = Domain.for_worker(self.run_dir, f"worker-{tenant.name}-{model.name}", devices)
        settings = self._settings_for(pki, (tenant.name,), model, domain, self.config.supervisor.scrub)
        return settings, domain

    def shared_worker_settings(
        self, pki: DevPki, tenants: tuple[str, ...], model: ModelConfig, devices: tuple[str, ...] = ()
    ) -> tuple[WorkerSettings, Domain]:
        """One model's shared worker: every opted-in tenant, each with its attestation identity."""
        domain = Domain.for_worker(self.run_dir, f"worker-{SHARED}-{model.name}", devices)
        # State is zeroed between tenants whatever dedicated workers do ("off" leaves it to the exit scrub).
        scrub = "request" if self.config.supervisor.scrub == "request" else "tenant-switch"
        return self._settings_for(pki, tenants, model, domain, scrub, isolation="shared"), domain

    def _settings_for(
        self,
        pki: DevPki,
        tenants: tuple[str, ...],
        model: ModelConfig,
        domain: Domain,
        scrub: str,
        isolation: str = "dedicated",
    ) -> WorkerSettings:
        identities = []
        for tenant in tenants:  # each tenant with its own attestation certificate and key
            attest = worker_attestation_cert(pki, tenant, self.config.auth.mtls.trust_domain)
            identities.append(TenantIdentity(tenant, attest.cert, attest.key))
        gateway = self.config.gateway
        return WorkerSettings(
            tenants=tuple(identities),
            model=model.name,
            engine=model.engine,
            model_path=model.path,
            cache_dir=self.config.model_cache_dir,
            tls=TlsFiles(pki.worker_cert, pki.worker_key, pki.ca_cert),
            isolation=isolation,
            domain=DomainSettings(
                device=domain.device,
                arena=domain.arena,
                arena_bytes=self.config.supervisor.arena_mb << 20,
                canary_file=domain.canaries,
                scrub=scrub,
                tensor_parallel_size=max(1, len(domain.devices)) if model.engine == "vllm" else 1,
            ),
            bundles=BundleTrust(
                trusted_keys=self.config.bundle_trusted_keys,
                require_signed=self.config.bundles.require_signed,
                # Only the bundled model is signed with the dev key (when it is converted).
                signing_key=pki.bundle_key if model.path == "bundled" else None,
            ),
            limits=RequestLimits(
                gateway.limits.max_tokens, gateway.limits.default_max_tokens, gateway.max_message_bytes
            ),
            hpke_suite=self.config.sealing.hpke_suite,
            echo_tokens_per_second=model.tokens_per_second,
            threads=model.threads,
            allow_special_tokens=model.allow_special_tokens,
            s3=self.config.s3 if model.path.startswith("s3://") else None,
        )

    def settings_file(self, key: tuple[str, str]) -> Path:
        return self.run_dir / f"worker-{key[0]}-{key[1]}.settings.json"

    def _write_settings(self, key: tuple[str, str], settings: WorkerSettings) -> None:
        settings.write(self.settings_file(key))
        self.settings[key] = settings

    def start_worker(
        self, key: tuple[str, str], settings: WorkerSettings, domain: Domain, *, timeout: float
    ) -> Child:
        """Start one more worker (a tenant added while the stack serves): its domain scrubbed first,
        ready within `timeout` or stopped again (StackError). The supervisor watches it only once
        it is in `workers`, which the caller does when it is routed."""
        with self.lock:
            self.domains[key] = domain
        self._write_settings(key, settings)
        if self.supervisor is None:
            raise StackError("the stack is not running")
        scrubbed = self.supervisor.scrub(key, "start")
        if not scrubbed["verified"]:
            raise StackError(f"domain {domain.id} failed its scrub and stays out of service: "
                             f"{scrubbed.get('reason')}")  # fmt: skip
        child = self._spawn_worker(key)
        try:
            self._wait_ready([child], time.monotonic() + timeout, self.events)
        except BaseException:
            _terminate([child], 15)
            raise
        self._write_settings(key, replace(settings, listen=f"127.0.0.1:{child.port}"))
        return child

    def remove_worker(self, key: tuple[str, str]) -> bool:
        """Stop a worker whose routes are gone (its calls drained): SIGTERM, then scrub its domain
        (audited) and remove its files. True when the scrub verified."""
        with self.lock:
            child = self.workers.pop(key)
            if self.supervisor is not None:
                self.supervisor.forget(key)
        _terminate([child], self.config.gateway.grace_seconds + 5)
        supervisor, domain = self.supervisor, self.domains[key]
        verified = supervisor is not None and bool(supervisor.scrub(key, "remove")["verified"])
        if supervisor is not None:
            supervisor.audit.record("worker_removed", tenant=key[0], model=key[1], domain=domain.id,
                                    pid=child.process.pid, code=child.process.returncode,
                                    scrub_verified=verified)  # fmt: skip
        with self.lock:
            del self.domains[key]
            self.settings.pop(key, None)
        if verified:
            self._remove_domain_files(domain)
        child.ready_file.unlink(missing_ok=True)
        self.settings_file(key).unlink(missing_ok=True)
        return verified

    def _spawn_worker(self, key: tuple[str, str]) -> Child:
        args = ["-m", "worker", "--settings", str(self.settings_file(key))]
        return self._spawn(f"worker-{key[0]}-{key[1]}", args, self.domains[key].env)

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str]) -> Child:
        log = self.run_dir / f"{name}.log"
        ready = self.run_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **ALLOCATOR_ENV, **extra_env}
        with log.open("ab") as fh:
            shim = [self.python, "-c", _DIE_WITH_PARENT, str(os.getpid())]
            process = subprocess.Popen(
                [*shim, self.python, *args, "--ready-file", str(ready), "--log-level", self.log_level],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return Child(name, process, log, ready)

    def _wait_ready(self, children: list[Child], deadline: float, progress: Callable[[str], None]) -> None:
        pending = list(children)
        last_note = time.monotonic()
        while pending:
            for child in list(pending):
                if child.ready_file.exists():
                    child.info = json.loads(child.ready_file.read_text())
                    pending.remove(child)
                    progress(f"{child.name} ready on port {child.port}")
                elif child.process.poll() is not None:
                    raise StackError(
                        f"{child.name} exited with code {child.process.returncode} before it was ready; "
                        f"its log ({child.log}) ends with:\n{child.log_tail()}"
                    )
            if not pending:
                return
            if time.monotonic() > deadline:
                raise StackError(f"timed out waiting for {', '.join(c.name for c in pending)}")
            if time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                progress(f"still starting: {', '.join(c.name for c in pending)} (model load)")
            time.sleep(0.05)

    def _check_health(self, deadline: float) -> None:
        if self.pki is None or self.gateway is None:
            raise StackError("health check before start")
        credentials = grpc.ssl_channel_credentials(self.pki.ca_cert.read_bytes())
        with grpc.secure_channel(self.address, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    status = exc.code().name
                exited = self.gateway.process.poll()
                if time.monotonic() > deadline or exited is not None:
                    why = f"exited ({exited})" if exited is not None else f"not serving ({status})"
                    raise StackError(f"gateway {why}; its log ({self.gateway.log}) ends "
                                     f"with:\n{self.gateway.log_tail()}")  # fmt: skip
                time.sleep(0.1)

    def worker_credentials(self) -> grpc.ChannelCredentials | None:
        """How the launcher's side talks to its workers (the gateway's certificate), once started."""
        if self.pki is None:
            return None
        pki = self.pki
        return grpc.ssl_channel_credentials(
            pki.ca_cert.read_bytes(), pki.gateway_key.read_bytes(), pki.gateway_cert.read_bytes()
        )

    def spawn_worker(self, key: tuple[str, str]) -> Child:
        """Start a worker again, on its first address (the supervisor scrubbed its domain first).

        Returns at once; the new child has no `info` until its ready file appears.
        """
        child = self.workers[key] = self._spawn_worker(key)  # its settings name its first address
        return child

    def kill_worker(self, key: tuple[str, str]) -> None:
        _signal_group(self.workers[key], signal.SIGKILL)

    def reap(self, child: Child) -> None:
        _signal_group(child, signal.SIGKILL)

    def children(self) -> list[Child]:
        return ([self.gateway] if self.gateway else []) + list(self.workers.values())

    def stop(self, timeout: float | None = None) -> None:
        """Stop the gateway first (it drains in-flight calls), then the workers; kill stragglers.
        Scrubs every domain, then removes the run files (logs stay)."""
        grace = self.config.gateway.grace_seconds if timeout is None else timeout
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stop()  # no restarts while shutting down (its thread lives on, see close())
        self.state_file.unlink(missing_ok=True)  # stopping: no command should find this stack now
        if self.gateway is not None:
            _terminate([self.gateway], grace + 5)
        _terminate(list(self.workers.values()), 15)
        if supervisor is not None:
            # Drained and stopped: scrub every domain so no tenant's data outlives the stack.
            supervisor.close()
            for key, domain in self.domains.items():
                if key in self.workers and supervisor.scrub(key, "shutdown")["verified"]:
                    self._remove_domain_files(domain)
            supervisor.audit.close()
        archiver, self.archiver = self.archiver, None
        if archiver is not None:
            archiver.close()  # ships the supervisor's closing signature, if the store lets it
        for child in self.children():
            child.ready_file.unlink(missing_ok=True)
        for key in self.settings:
            self.settings_file(key).unlink(missing_ok=True)

    @staticmethod
    def _remove_domain_files(domain: Domain) -> None:
        """A verified scrub leaves nothing to keep: the arena, and the canary records it checked."""
        for path in (domain.arena, domain.canaries, domain.cuda_canaries):
            path.unlink(missing_ok=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(children: list[Child], timeout: float) -> None:
    for child in children:
        if child.process.poll() is None:
            _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.process.wait()
        # Anything the child itself started lives in its group; make sure none outlives it.
        _signal_group(child, signal.SIGKILL)


def _signal_group(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, sig)
