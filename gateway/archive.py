"""The audit trail's copy in WORM object storage: each closed segment and every signed chain head,
under an S3 Object Lock COMPLIANCE retention that no one, root and the store's admin included, can
shorten or lift before it ends.

    PREFIX/LOG/heads/SEQ-HASH.json       one per signature in LOG's sidecar (airlock-audit-head/1)
    PREFIX/LOG/segments/N-SHA.jsonl[.sealed]  the rotated file LOG.N, once closed

Driven by the files on disk, not by a queue in memory: a ledger beside the log (`LOG.archive.json`)
records what the store acknowledged, so an outage of the store, or of the gateway, loses nothing:
the archiver catches up from the files when it can. It runs in its own thread and never blocks
a request: the audit log only wakes it (`wake`) after a signature or a rotation. Heads go first
(small, and what `airlock audit verify --archive` needs to catch a truncated tail); then segments,
oldest first, sealed with AES-256-GCM under a dedicated key when `audit.archive.seal_key` is set.
The backlog (what the store has not acknowledged) is in metrics and in the health service
`airlock.audit.archive`, which says NOT_SERVING while the store fails or the backlog is over its
bound; the gateway itself keeps serving.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.audit import HEAD_FORMAT, segments
from gateway.config import AuditArchiveConfig
from serving.s3 import ObjectStore, S3Settings, S3Url, StorageError

__all__ = [
    "HEALTH_SERVICE",
    "ArchiveLayout",
    "ArchiveMetrics",
    "Archiver",
    "load_seal_key",
    "open_sealed",
    "seal",
]

HEALTH_SERVICE = "airlock.audit.archive"
SEALED_MAGIC = b"airlock-sealed-v1\n"
_HEADS_PER_SAVE = 64  # the ledger is saved at least this often while heads catch up
_log = logging.getLogger("airlock.audit.archive")


def load_seal_key(path: Path) -> bytes:
    """The archive's dedicated AES-256 key: a 0600 file of 32 bytes, or of 64 hex digits."""
    from gateway.keys.store import check_private_file

    check_private_file(path, "audit archive seal key")
    raw = path.read_bytes()
    text = raw.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode())
    if len(raw) == 32:
        return raw
    raise ValueError(f"audit archive seal key {path}: must be 32 bytes, or 64 hex digits")


def seal(key: bytes, object_key: str, data: bytes) -> bytes:
    """AES-256-GCM, bound to the object's key: a sealed segment moved to another name won't open."""
    nonce = secrets.token_bytes(12)
    return SEALED_MAGIC + nonce + AESGCM(key).encrypt(nonce, data, object_key.encode())


def open_sealed(key: bytes, object_key: str, blob: bytes) -> bytes:
    if not blob.startswith(SEALED_MAGIC):
        raise ValueError(f"{object_key}: not a sealed archive object")
    body = blob[len(SEALED_MAGIC) :]
    return AESGCM(key).decrypt(body[:12], body[12:], object_key.encode())


@dataclass(frozen=True)
class ArchiveLayout:
    """Where one log's heads and segments go: `{host}` in the URL's prefix is this host's name, so
    replicas sharing one configuration keep apart."""

    url: S3Url
    log: str

    @classmethod
    def of(cls, url: str, log: str) -> ArchiveLayout:
        return cls(S3Url.parse(url.replace("{host}", socket.gethostname())), log)

    def head_key(self, seq: int, head: str) -> str:
        """Seq and hash in the name: a listing alone says which heads the archive holds."""
        return self.url.key(f"{self.log}/heads/{seq:020d}-{head}.json")

    @property
    def heads_prefix(self) -> str:
        return self.url.key(f"{self.log}/heads/")

    def segment_key(self, number: int, digest: str, sealed: bool) -> str:
        """Number and sha256 of the plaintext in the name: a later file that reuses a number (rotated
        files deleted locally, numbering started over) is another object, never a replacement."""
        name = f"{self.log}/segments/{number:08d}-{digest[:16]}.jsonl" + (".sealed" if sealed else "")
        return self.url.key(name)


class ArchiveMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.backlog_segments = Gauge(
            "airlock_audit_archive_backlog_segments",
            "Closed audit segments not yet in the archive",
            ["log"],
            registry=r,
        )
        self.backlog_heads = Gauge(
            "airlock_audit_archive_backlog_heads",
            "Signed audit heads not yet in the archive",
            ["log"],
            registry=r,
        )
        self.archived = Counter(
            "airlock_audit_archived",
            "Objects the archive acknowledged, by kind (head, segment)",
            ["log", "kind"],
            registry=r,
        )
        self.errors = Counter(
            "airlock_audit_archive_errors",
            "Failed archive attempts (the store refused or could not be reached)",
            ["log"],
            registry=r,
        )
        self.healthy = Gauge(
            "airlock_audit_archive_healthy",
            "1 while the archive keeps up (store reachable, backlog within its bound)",
            ["log"],
            registry=r,
        )


class Archiver:
    """Ships one audit log (`path`) to the archive; `start`, `wake` on change, `close` at the end."""

    def __init__(
        self,
        path: Path,
        config: AuditArchiveConfig,
        s3: S3Settings,
        *,
        registry: CollectorRegistry,
        on_health: Callable[[bool], None] | None = None,
        store: ObjectStore | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.layout = ArchiveLayout.of(config.url, path.name)
        self.seal_key = load_seal_key(config.seal_key) if config.seal_key is not None else None
        self.store = store or ObjectStore(s3)  # credentials are read now: a bad file fails the start
        self.metrics = ArchiveMetrics(registry)
        self.on_health = on_health
        self.ledger_path = path.with_name(f"{path.name}.archive.json")
        self.healthy: bool | None = None
        self.last_error: str | None = None
        self._bucket_ready = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"audit-archive-{path.name}", daemon=True)

    # --- the thread --------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake.set()  # whatever an earlier run left behind goes first
        self._thread.start()

    def wake(self) -> None:
        """Something changed on disk (called by the audit log with its lock held: only a flag)."""
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Ship what is pending (the final signature, most of all) within `timeout`, then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if failures:  # back off while the store fails: a signature's wake-up does not cut it short
                self._stop.wait(min(60.0, self.config.poll_seconds * 2 ** min(failures, 6)))
            else:
                self._wake.wait(self.config.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            failures = 0 if self._attempt() else failures + 1
        self._attempt()  # the last signature (at close) and whatever else is still pending

    def _attempt(self) -> bool:
        try:
            self.run_once()
            return True
        except Exception as exc:  # the thread must survive anything; the files keep the backlog
            self._failed(exc)
            return False

    # --- one pass ------------------------------------------------------------------------------------

    def backlog(self) -> tuple[list[Path], int]:
        """Closed segments the archive lacks, and how many signed heads it lacks."""
        ledger = self._ledger()
        shipped = ledger.get("segments", {})
        closed = [p for p in segments(self.path) if p != self.path and not _same_file(p, shipped.get(p.name))]
        _offset, data = self._unshipped_heads(ledger)
        return closed, data.count(b"\n")

    def _unshipped_heads(self, ledger: dict[str, Any]) -> tuple[int, bytes]:
        """Where the sidecar's unarchived signatures start, and their whole lines (read from there:
        the sidecar grows for the life of the log)."""
        sidecar = self.path.with_name(f"{self.path.name}.sig")
        offset = int(ledger.get("sig_offset", 0))
        try:
            with sidecar.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if offset > size:  # the sidecar was replaced or cut: ship it all again (same keys)
                    offset = 0
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return 0, b""
        return offset, data[: data.rfind(b"\n") + 1]  # whole lines only

    def run_once(self) -> bool:
        """Ship everything pending; True when the archive holds it all. StorageError: try later."""
        if not self._bucket_ready:
            self.store.ensure_bucket(self.layout.url.bucket, object_lock=True)
            self._bucket_ready = True
        ledger = self._ledger()
        self._ship_heads(ledger)
        closed, _heads = self.backlog()
        for segment in closed:
            self._ship_segment(segment, ledger)
        closed, heads = self.backlog()
        self._publish(len(closed), heads, ok=True)
        return not closed and not heads

    def _retain_until(self) -> datetime.datetime:
        now = datetime.datetime.now(datetime.UTC)
        return now + datetime.timedelta(days=self.config.retention_days)

    def _ship_heads(self, ledger: dict[str, Any]) -> None:
        offset, data = self._unshipped_heads(ledger)
        if offset < int(ledger.get("sig_offset", 0)):
            _log.warning(
                "audit sidecar of %s is shorter than what was archived; archiving it again", self.path
            )
        shipped = 0
        for line in data.splitlines(keepends=True):
            document = head_document(self.path.name, line)
            if document is not None:
                body = json.dumps(document, sort_keys=True).encode() + b"\n"
                self.store.put(
                    self.layout.url.bucket,
                    self.layout.head_key(document["seq"], document["hash"]),
                    body,
                    retain_until=self._retain_until(),
                )
                self.metrics.archived.labels(self.path.name, "head").inc()
            offset += len(line)
            shipped += 1
            ledger["sig_offset"] = offset
            if shipped % _HEADS_PER_SAVE == 0:
                self._save(ledger)
        if shipped:
            self._save(ledger)

    def _ship_segment(self, segment: Path, ledger: dict[str, Any]) -> None:
        number = int(segment.name.rsplit(".", 1)[-1])
        st = segment.stat()
        data = segment.read_bytes()  # one closed segment at a time (at most audit.rotate_bytes)
        digest = hashlib.sha256(data).hexdigest()
        key = self.layout.segment_key(number, digest, self.seal_key is not None)
        body = seal(self.seal_key, key, data) if self.seal_key is not None else data
        version = self.store.put(self.layout.url.bucket, key, body, retain_until=self._retain_until())
        ledger.setdefault("segments", {})[segment.name] = {
            "key": key,
            "version": version,
            "sha256": digest,
            "bytes": len(data),
            "mtime_ns": st.st_mtime_ns,
        }
        self._save(ledger)
        self.metrics.archived.labels(self.path.name, "segment").inc()
        _log.info("audit segment archived", extra={"segment": segment.name, "key": key, "bytes": len(data)})

    # --- state ---------------------------------------------------------------------------------------

    def _ledger(self) -> dict[str, Any]:
        try:
            ledger = json.loads(self.ledger_path.read_bytes())
            return ledger if isinstance(ledger, dict) else {}
        except FileNotFoundError:
            return {}
        except ValueError:
            _log.error("audit archive ledger %s unreadable; archiving everything again", self.ledger_path)
            return {}

    def _save(self, ledger: dict[str, Any]) -> None:
        tmp = self.ledger_path.with_name(f".{self.ledger_path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(ledger, fh, sort_keys=True)
        os.replace(tmp, self.ledger_path)

    def _failed(self, exc: Exception) -> None:
        why = str(exc) if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
        self.metrics.errors.labels(self.path.name).inc()
        if why != self.last_error:  # once per kind of failure, not once per retry
            _log.error("audit archive: %s; the backlog stays on disk and is retried", why)
        self.last_error = why
        try:
            closed, heads = self.backlog()
        except Exception:
            closed, heads = [], 0
        self._publish(len(closed), heads, ok=False)

    def _publish(self, closed: int, heads: int, *, ok: bool) -> None:
        self.metrics.backlog_segments.labels(self.path.name).set(closed)
        self.metrics.backlog_heads.labels(self.path.name).set(heads)
        healthy = ok and closed <= self.config.max_backlog_segments
        self.metrics.healthy.labels(self.path.name).set(1 if healthy else 0)
        if ok:
            self.last_error = None
        if healthy != self.healthy:
            self.healthy = healthy
            if healthy:
                _log.info("audit archive keeping up", extra={"log": self.path.name})
            if self.on_health is not None:
                self.on_health(healthy)


def _same_file(path: Path, entry: Any) -> bool:
    """Whether the ledger's entry is this very file (a closed segment never changes; a file that
    took an archived one's name has another size or modification time)."""
    if not isinstance(entry, dict):
        return False
    try:
        st = path.stat()
    except FileNotFoundError:
        return True  # gone meanwhile: nothing to ship
    return bool(entry.get("bytes") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns)


def head_document(log: str, line: bytes) -> dict[str, Any] | None:
    """A sidecar signature line as an `airlock-audit-head/1` document (None: not a signature)."""
    try:
        entry = json.loads(line)
        if not re.fullmatch(r"[0-9a-f]{64}", str(entry["hash"])):
            raise ValueError("not a head hash")
        return {
            "format": HEAD_FORMAT,
            "log": log,
            "seq": int(entry["seq"]),
            "hash": str(entry["hash"]),
            "ts": float(entry.get("ts", 0.0)),
            "key_id": str(entry["key_id"]),
            "sig": str(entry["sig"]),
        }
    except (ValueError, KeyError, TypeError):
        _log.error("audit sidecar of %s holds a line that is not a signature; not archived", log)
        return None
