"""The worker supervisor: health checks, scrub-then-restart with backoff, metrics and audit records.

It runs as a thread of the launcher (`Stack`), which owns the worker processes. A worker that
exits or stops answering health checks is killed (its whole process group), its domain is scrubbed
by `python -m worker.isolation.scrub` (a process: the gateway side never imports worker code), and only a
verified scrub hands the domain to a new worker, on the same address, so the gateway's channel to
it reconnects by itself. A failed scrub keeps the domain out of service and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from control.children import Child
from gateway.audit import AuditLog
from gateway.config import SupervisorConfig


class Workers(Protocol):
    """What the supervisor needs of the launcher, which owns the worker processes."""

    python: str
    workers: dict[tuple[str, str], Child]
    domains: dict[tuple[str, str], Domain]
    lock: threading.RLock  # held while the workers or domains change (tenants come and go)

    def worker_credentials(self) -> grpc.ChannelCredentials | None: ...

    def spawn_worker(self, key: tuple[str, str]) -> Child: ...

    def kill_worker(self, key: tuple[str, str]) -> None: ...

    def reap(self, child: Child) -> None: ...


__all__ = ["Domain", "ScrubFailedError", "Supervisor", "SupervisorMetrics", "merge_scrubs", "run_scrub"]

_log = logging.getLogger("airlock.supervisor")
SHM = Path("/dev/shm")


class ScrubFailedError(Exception):
    """A domain's scrub did not verify; the domain stays out of service."""


@dataclass(frozen=True)
class Domain:
    """One worker's CPU isolation domain: its arena (request state, canaries) and canary record."""

    id: str
    arena: Path
    canaries: Path
    devices: tuple[str, ...] = ()  # CUDA UUIDs; none: a CPU domain

    @classmethod
    def for_worker(cls, run_dir: Path, name: str, devices: tuple[str, ...] = ()) -> Domain:
        # /dev/shm is memory (tmpfs); the run directory's digest keeps parallel stacks apart.
        digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
        base = SHM if SHM.is_dir() else run_dir
        kind = ",".join(devices) if devices else "cpu"
        return cls(f"{kind}:{digest}:{name}", base / f"airlock-{digest}-{name}.arena",
                   run_dir / f"{name}.canaries.json", devices)  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        """Pins a process to this domain: its GPUs only, or none at all for a CPU domain."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)}

    @property
    def cuda_canaries(self) -> Path:
        return self.canaries.with_suffix(".cuda.json")

    @property
    def device(self) -> str:
        return "cuda" if self.devices else "cpu"


def run_scrub(python: str, domain: Domain, timeout: float = 300.0) -> dict[str, Any]:
    """Scrub `domain` in a separate process; returns its result (with `verified`), never raises.

    A GPU domain is scrubbed twice, its device memory and then the arena its worker kept on the
    host; the result covers both (bytes and canary hits added, `device_bytes` the GPU's share).
    """
    arena_cmd = [
        python,
        "-m",
        "worker.isolation.scrub",
        "--arena",
        str(domain.arena),
        "--canaries",
        str(domain.canaries),
    ]
    if not domain.devices:
        return _scrub_once(arena_cmd, domain, timeout)
    cuda_cmd = [
        python,
        "-m",
        "worker.isolation.scrub",
        "--device",
        "cuda",
        "--canaries",
        str(domain.cuda_canaries),
    ]
    device = _scrub_once(cuda_cmd, domain, timeout)
    if not device["verified"]:
        return {**device, "reason": f"GPU memory: {device.get('reason') or 'not verified'}"}
    return merge_scrubs(device, _scrub_once(arena_cmd, domain, timeout))


def merge_scrubs(device: dict[str, Any], arena: dict[str, Any]) -> dict[str, Any]:
    """One result for a GPU domain's two scrubs (the device's verified already)."""
    total = int(device.get("bytes", 0)) + int(arena.get("bytes", 0))
    seconds = float(device.get("seconds", 0.0)) + float(arena.get("seconds", 0.0))
    reasons = [
        f"{part}: {r['reason']}" for part, r in (("GPU memory", device), ("arena", arena)) if r.get("reason")
    ]
    return {
        **arena,
        "bytes": total,
        "device_bytes": int(device.get("bytes", 0)),
        "seconds": seconds,
        "gbps": round(total / seconds / 1e9, 3) if seconds > 0 else 0.0,
        "canary_hits": int(device.get("canary_hits", 0)) + int(arena.get("canary_hits", 0)),
        "nonzero_bytes": int(device.get("nonzero_bytes", 0)) + int(arena.get("nonzero_bytes", 0)),
        "reason": "; ".join(reasons),
        "verified": bool(arena["verified"]),
    }


def _scrub_once(cmd: list[str], domain: Domain, timeout: float) -> dict[str, Any]:
    env = {**os.environ, **domain.env}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"verified": False, "reason": f"scrubber did not run: {type(exc).__name__}"}
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"verified": False, "reason": f"scrubber exited {done.returncode} without a result"}
    result["verified"] = bool(result.get("verified")) and done.returncode == 0
    return result


class SupervisorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.restarts = Counter("airlock_worker_restarts", "Workers restarted after a crash",
                                ["tenant", "model"], registry=r)  # fmt: skip
        self.scrubs = Counter("airlock_domain_scrubs", "Domain scrubs, by result (verified, failed)",
                              ["tenant", "model", "result"], registry=r)  # fmt: skip
        self.scrub_bytes = Counter("airlock_domain_scrub_bytes", "Bytes overwritten and verified",
                                   ["tenant", "model"], registry=r)  # fmt: skip
        self.canary_hits = Counter("airlock_domain_canary_hits", "Canaries found after a scrub",
                                   ["tenant", "model"], registry=r)  # fmt: skip
        self.out_of_service = Gauge("airlock_domains_out_of_service", "Domains kept out of service",
                                    registry=r)  # fmt: skip

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


class Supervisor:
    def __init__(
        self,
        stack: Workers,
        settings: SupervisorConfig,
        audit: AuditLog,
        metrics: SupervisorMetrics,
        notify: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.stack = stack
        self.notify = notify  # one line for the operator per crash, scrub and restart
        self.settings = settings
        self.audit = audit
        self.metrics = metrics
        self.out_of_service: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._release = threading.Event()
        self._crashes: dict[tuple[str, str], int] = {}
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._next_health = 0.0
        self._unhealthy: dict[tuple[str, str], int] = {}  # consecutive failed health checks
        self._due: dict[tuple[str, str], float] = {}  # scrubbed, restart due at this monotonic time
        self._delays: dict[tuple[str, str], float] = {}
        self._starting: dict[tuple[str, str], float] = {}  # restarted, not ready yet
        self._down: set[tuple[str, str]] = set()  # exited with restarts off
        self.restarts: dict[tuple[str, str], int] = {}  # since the stack started

    def state(self, key: tuple[str, str]) -> str:
        """What the supervisor is doing with a worker: running, starting, restarting (scrubbed, its
        restart due), out of service (a scrub failed) or stopped (exited with restarts off)."""
        if key in self.out_of_service:
            return "out of service"
        if key in self._down:
            return "stopped"
        if key in self._due:
            return "restarting"
        if key in self._starting:
            return "starting"
        return "running"

    def forget(self, key: tuple[str, str]) -> None:
        """A worker removed from the stack (its tenant left): nothing more to supervise."""
        self._crashes.pop(key, None)
        self._unhealthy.pop(key, None)
        self._due.pop(key, None)
        self._delays.pop(key, None)
        self._starting.pop(key, None)
        self.restarts.pop(key, None)
        self._down.discard(key)
        self.out_of_service.pop(key, None)
        self.metrics.out_of_service.set(len(self.out_of_service))

    def scrub(self, key: tuple[str, str], phase: str) -> dict[str, Any]:
        """Scrub one worker's domain and record it; a failed scrub takes the domain out of service."""
        domain = self.stack.domains[key]
        tenant, model = key
        result = run_scrub(self.stack.python, domain)
        verified = bool(result["verified"])
        self.metrics.scrubs.labels(tenant, model, "verified" if verified else "failed").inc()
        self.metrics.scrub_bytes.labels(tenant, model).inc(int(result.get("bytes", 0)))
        self.metrics.canary_hits.labels(tenant, model).inc(int(result.get("canary_hits", 0)))
        keys = ("bytes", "device_bytes", "gbps", "canaries_before", "canary_hits", "reason")
        fields = {k: result[k] for k in keys if k in result}
        self.audit.record("domain_scrub", tenant=tenant, model=model, domain=domain.id, phase=phase,
                          verified=verified, **fields)  # fmt: skip
        if not verified:
            reason = str(result.get("reason") or "verification failed")
            self.out_of_service[key] = reason
            self.metrics.out_of_service.set(len(self.out_of_service))
            self.audit.record("domain_out_of_service", tenant=tenant, model=model, domain=domain.id,
                              reason=reason)  # fmt: skip
            where = {"tenant": tenant, "model": model, "domain": domain.id, "reason": reason}
            _log.error("domain kept out of service: scrub not verified", extra=where)
        return result

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more health checks or restarts; the thread stays until `close()`."""
        self._stop.set()

    def close(self) -> None:
        """Call once the workers are down: the thread that started a worker must outlive it,
        because the kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child exits."""
        self._stop.set()
        self._release.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        self._watch()
        self._release.wait()

    def _watch(self) -> None:
        # One pass every 0.1 s; nothing here waits for a backoff or a model load, so one domain's
        # crash loop never delays another tenant's recovery.
        while not self._stop.wait(0.1):
            with self.stack.lock:  # no worker is added or removed during a pass
                self._pass()

    def _pass(self) -> None:
        for key, child in list(self.stack.workers.items()):
            if self._stop.is_set() or key in self.out_of_service or key in self._down:
                continue
            if key in self._due:
                if time.monotonic() >= self._due[key]:
                    self._respawn(key)
            elif child.process.poll() is not None:
                self._recover(key, child)
            elif key in self._starting and child.ready_file.exists():
                self._started(key, child)
        if time.monotonic() >= self._next_health:
            self._next_health = time.monotonic() + self.settings.health_interval_seconds
            self._health_checks()

    def _health_checks(self) -> None:
        for key, child in list(self.stack.workers.items()):
            if self._stop.is_set() or key in self.out_of_service or key in self._starting or not child.info:
                continue
            if child.process.poll() is not None:
                continue
            if self._healthy(child):
                self._unhealthy.pop(key, None)
                continue
            self._unhealthy[key] = misses = self._unhealthy.get(key, 0) + 1
            if misses >= 3:  # a hung worker: kill its group; the exit path scrubs and restarts it
                _log.error("worker failed 3 health checks; killing it", extra={"worker": child.name})
                self.notify(f"{child.name} (pid {child.process.pid}) failed 3 health checks: killed")
                self.stack.kill_worker(key)
                self._unhealthy.pop(key, None)

    def _healthy(self, child: Child) -> bool:
        creds = self.stack.worker_credentials()
        if creds is None:
            return True
        try:
            with grpc.secure_channel(f"127.0.0.1:{child.port}", creds) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def _recover(self, key: tuple[str, str], child: Child) -> None:
        """A worker exited: reap its group, scrub its domain, and schedule a restart after a backoff."""
        tenant, model = key
        code = child.process.returncode
        self._starting.pop(key, None)
        self._unhealthy.pop(key, None)
        self.stack.reap(child)  # nothing the worker started may outlive it
        self.audit.record("worker_exit", tenant=tenant, model=model, domain=self.stack.domains[key].id,
                          code=code, pid=child.process.pid)  # fmt: skip
        _log.warning("worker exited", extra={"worker": child.name, "code": code})
        domain = self.stack.domains[key]
        self.notify(f"{child.name} (pid {child.process.pid}) exited with code {code}; scrubbing {domain.id}")
        scrubbed = self.scrub(key, "crash")
        if not scrubbed["verified"]:
            self.notify(f"{domain.id}: scrub NOT verified ({self.out_of_service.get(key)}); "
                        f"{child.name} stays out of service")  # fmt: skip
            return  # out of service, and said so
        if not self.settings.restart:
            self._down.add(key)
            self.notify(f"{domain.id}: scrubbed and verified; {child.name} stays down (supervisor.restart "
                        "is off)")  # fmt: skip
            return
        crashes = self._crashes.get(key, 0)
        if child.info and time.monotonic() - child.started > 60:
            crashes = 0  # it served a good while: start the backoff over
        delay = min(self.settings.backoff_max_seconds, self.settings.backoff_seconds * 2**crashes)
        self._crashes[key] = crashes + 1
        self._due[key] = time.monotonic() + delay
        self._delays[key] = delay
        self.notify(f"{domain.id}: scrubbed and verified ({_size(scrubbed.get('bytes', 0))}); restarting "
                    f"{child.name} in {delay:.1f} s")  # fmt: skip

    def _respawn(self, key: tuple[str, str]) -> None:
        del self._due[key]
        try:
            self.stack.spawn_worker(key)
        except OSError as exc:  # the old, dead child stays: the next pass treats it as another crash
            name = self.stack.workers[key].name
            _log.error("worker restart failed", extra={"worker": name, "error": str(exc)})
            return
        self._starting[key] = time.monotonic()

    def _started(self, key: tuple[str, str], child: Child) -> None:
        tenant, model = key
        child.info = json.loads(child.ready_file.read_text())
        del self._starting[key]
        self.restarts[key] = self.restarts.get(key, 0) + 1
        self.metrics.restarts.labels(tenant, model).inc()
        self.notify(f"{child.name} restarted: pid {child.process.pid}, port {child.port} (restart "
                    f"{self.restarts[key]})")  # fmt: skip
        self.audit.record("worker_restart", tenant=tenant, model=model, domain=self.stack.domains[key].id,
                          attempt=self._crashes.get(key, 0), delay_seconds=self._delays.get(key),
                          port=child.port, pid=child.process.pid)  # fmt: skip


def _size(count: object) -> str:
    value = float(count) if isinstance(count, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
