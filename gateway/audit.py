"""The gateway's audit trail: one hash-chained JSON line per security decision, signed periodically.

Records never hold a token, a key, a prompt or a completion: only identifiers, decisions, reason
codes and sizes. Each record carries `seq` and `prev` (the previous record's `hash`) and its own
`hash`, the SHA-256 of its canonical JSON without `hash`. The chain head is signed with Ed25519
every `sign_every_records` records, every `sign_every_seconds`, at rotation and at close; the
signatures go to a sidecar file (`<path>.sig`) so truncating the log is caught by a signature
that points past its end. `airlock audit verify` (control/audit_verify.py) checks all of it; the
format is documented in docs/operations.md.

Writing is cheap where it can be: each record is JSON-encoded once and hashed as encoded (the hash
is appended as the line's last member), and the lines of a group go to the file in one gather
write, never joined into one buffer. A
decision about to take effect can be `submit`ted instead of `record`ed: with `fsync = "always"`, the
records submitted while the previous group was being fsynced are written and fsynced together by
one committer thread (a group commit) and each caller awaits its group; with the other policies a
submitted record is written at once, as `record` does (one system call; batching it would cost the
caller an event-loop turn). Either way a record is written, and fsynced as the policy says, before
its caller goes on: a crash never loses a decision that took effect.

A log that can't be written fails closed: the failing record and every later one raise
`UnavailableError` ("audit log unavailable"), so no decision goes unrecorded. Because a full disk
stops every tenant, no record is ever longer than `MAX_RECORD_BYTES`: strings are cut to
`MAX_STRING_CHARS` and lists and mappings to `MAX_ITEMS`, each cut marked, and a record still too
long has its largest fields replaced by a marker (docs/operations.md, "Audit limits").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from airlock.errors import UnavailableError
from gateway.config import AuditConfig
from serving.bundle import key_id

__all__ = [
    "GENESIS",
    "HEAD_FORMAT",
    "MAX_ITEMS",
    "MAX_RECORD_BYTES",
    "MAX_STRING_CHARS",
    "AuditLog",
    "bounded",
    "canonical",
    "key_id",
    "load_signing_key",
    "record_hash",
    "segments",
    "signed_message",
]

GENESIS = "0" * 64  # the `prev` of the very first record
HEAD_FORMAT = "airlock-audit-head/1"  # a signed chain head on its own (`airlock audit head`, the archive)
RESERVED = frozenset({"seq", "ts", "event", "prev", "hash"})
MAX_STRING_CHARS = 256  # a longer string is cut to this many characters, and says so
MAX_ITEMS = 32  # items kept of a list or mapping
MAX_RECORD_BYTES = 4096  # no line of the log is longer, its hash and newline included
_MAX_DEPTH = 4  # deeper values are recorded as (bounded) text
_HASH_SUFFIX = len(',"hash":"') + 64 + len('"}\n') - 1  # what a body grows by on its line
_log = logging.getLogger("airlock.audit")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
_BODY_BUDGET = MAX_RECORD_BYTES - _HASH_SUFFIX  # a record's canonical JSON, before its hash is added
_IOV_MAX = 1024  # buffers one writev takes (Linux)


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: sorted keys, no spaces, ASCII only."""
    return _ENCODER.encode(record).encode()


def bounded(value: Any, depth: int = 0) -> Any:
    """`value` as a record may hold it: strings cut to MAX_STRING_CHARS, lists and mappings to
    MAX_ITEMS, integers to 64 bits, anything else as its (cut) text; every cut leaves a marker."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < 1 << 64 else f"[integer of {value.bit_length()} bits]"
    if isinstance(value, str):
        extra = len(value) - MAX_STRING_CHARS
        return value if extra <= 0 else f"{value[:MAX_STRING_CHARS]}...[{extra} more characters]"
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        items = list(value.items())
        out = {str(bounded(str(k))): bounded(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["..."] = f"[{len(items) - MAX_ITEMS} more items]"
        return out
    if depth < _MAX_DEPTH and isinstance(value, list | tuple):
        kept = [bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
        return [*kept, f"...[{len(value) - MAX_ITEMS} more items]"] if len(value) > MAX_ITEMS else kept
    try:
        text = str(value)
    except Exception:  # a value that can't even say what it is: its type will do
        text = f"<{type(value).__name__}>"
    return bounded(text, depth)


def _field(value: Any) -> Any:
    """`bounded(value)`, without the walk for what records mostly hold (short strings, numbers)."""
    kind = type(value)
    if kind is str:
        return value if len(value) <= MAX_STRING_CHARS else bounded(value)
    if kind is int:
        return value if -(1 << 63) <= value < 1 << 64 else bounded(value)
    if value is None or kind is float or kind is bool:
        return value
    return bounded(value)


def _encode(entry: dict[str, Any]) -> bytes:
    """The canonical JSON of `entry` (already bounded), at most `_BODY_BUDGET` bytes: encoded once,
    and again only for the rare record that has to be cut (`_fit`)."""
    body = canonical(entry)
    return body if len(body) <= _BODY_BUDGET else canonical(_fit(entry, _BODY_BUDGET))


def _fit(entry: dict[str, Any], budget: int) -> dict[str, Any]:
    """`entry` (already `bounded`) with its canonical JSON at most `budget` bytes: the largest fields
    other than the reserved ones are replaced by a marker until it fits; if even that is too long,
    only the smallest fields that fit are kept, and `dropped_fields` counts the others."""
    if len(canonical(entry)) <= budget:
        return entry
    out = dict(entry)
    sizes = {k: len(canonical({k: v})) for k, v in entry.items() if k not in RESERVED}
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        out[name] = f"[dropped: {sizes[name]} bytes over the record limit]"
        if len(canonical(out)) <= budget:
            return out
    kept = {k: v for k, v in entry.items() if k in RESERVED}
    names = sorted(sizes, key=lambda k: (sizes[k], k))
    for count, name in enumerate(names):
        trial = {**kept, name: entry[name], "dropped_fields": len(names) - count - 1}
        if len(canonical(trial)) > budget:
            return {**kept, "dropped_fields": len(names) - count}
        kept[name] = entry[name]
    return kept  # not reached: the fields did not fit together


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def signed_message(seq: int, head: str) -> bytes:
    """What a chain-head signature covers; the head hash covers every record up to `seq`."""
    return f"airlock-audit-v1:{seq}:{head}".encode()


def segments(path: Path) -> list[Path]:
    """The files of one log, oldest first: rotated `<path>.1`, `<path>.2`, … then `<path>` itself."""
    rotated = [p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1 :].isdigit()]
    rotated.sort(key=lambda p: int(p.name[len(path.name) + 1 :]))
    return [*rotated, path] if path.exists() else rotated


def _set_aside_legacy(path: Path) -> dict[str, Any] | None:
    """A log written before records were chained (its first and last records have no `seq`/`hash`)
    is kept, renamed `<path>.legacy-<unix time>`, and the chain starts afresh, naming it and its
    sha256. Only a regular file is considered, and a file with chained records is never set aside:
    a broken chain stays an error (fail closed)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a device (e.g. /dev/full in a test), a fifo: not ours to move
    except FileNotFoundError:
        return None
    digest, records, first, last = hashlib.sha256(), 0, b"", b""
    with path.open("rb") as fh:
        for line in fh:
            digest.update(line)
            if line.strip():
                records += 1
                first, last = first or line, line
    if not records:
        return None
    try:
        ends = [json.loads(first), json.loads(last)]
    except ValueError:
        return None  # not ours to judge here: opening reports the unreadable record
    if any(not isinstance(r, dict) or "seq" in r or "hash" in r for r in ends):
        return None
    target = path.with_name(f"{path.name}.legacy-{int(time.time())}")
    os.rename(path, target)
    _log.warning("audit log: unchained records from an earlier version set aside as %s", target.name)
    return {"file": target.name, "sha256": digest.hexdigest(), "records": records}


def _write_whole(fd: int, line: bytes, end: int, what: str) -> None:
    """Append one whole line or nothing (see `_write_all`)."""
    _write_all(fd, [line], end, what)


def _write_all(fd: int, lines: list[bytes], end: int, what: str) -> None:
    """Append whole lines, gathered in one write (nothing is copied into one buffer), or nothing:
    a short write (a full disk) is cut off again at `end`, so the file still ends on a whole record
    and, once there is room, a restarted gateway continues the chain instead of refusing to start on
    a partial record. Called with the file lock held."""
    size = written = 0
    try:
        for i in range(0, len(lines), _IOV_MAX):
            part = lines[i : i + _IOV_MAX]
            wanted = sum(len(line) for line in part)
            size += wanted
            done = os.write(fd, part[0]) if len(part) == 1 else os.writev(fd, part)
            written += done
            if done != wanted:
                size += sum(len(line) for line in lines[i + _IOV_MAX :])
                break
    except OSError:
        if written:  # an earlier part went in: take it out again
            _truncate(fd, end, what)
        raise
    if written != size:
        _truncate(fd, end, what)
        raise OSError(errno.EIO, f"short write to {what} ({written} of {size} bytes)")


def _truncate(fd: int, end: int, what: str) -> None:
    try:
        os.ftruncate(fd, end)
    except OSError as exc:
        _log.error("audit log: cannot remove a partial record from %s: %s", what, exc.strerror)


def _last_line(path: Path) -> bytes | None:
    """The last complete line of `path`, or None when it has none."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return None
            fh.seek(max(0, size - (1 << 20)))
            data = fh.read()
    except FileNotFoundError:
        return None
    if not data.endswith(b"\n"):
        raise UnavailableError(
            f"audit log {path} ends in a partial record; run `airlock audit verify` and move it aside",
            reason="AUDIT_UNAVAILABLE",
        )
    return data.rstrip(b"\n").rsplit(b"\n", 1)[-1]


# A record as its caller made it, before the chain gives it a place: (ts, event, bounded fields).
_Entry = tuple[float, str, dict[str, Any]]
# A submitted record waiting for the committer: the entry, its caller's future and that one's loop.
_Waiting = tuple[_Entry, "asyncio.Future[None]", asyncio.AbstractEventLoop]


class AuditLog:
    """Appends chained records to `path` (mode 0600); with no path, records go to the `airlock.audit`
    logger. Several processes may share one path: a lock file serialises them and each appends after
    whatever the others wrote last (the processes of one gateway, `gateway.processes`, do: one chain)."""

    def __init__(
        self,
        path: Path | None,
        *,
        config: AuditConfig | None = None,
        signing_key: ed25519.Ed25519PrivateKey | None = None,
    ) -> None:
        self.path = path
        self.config = config or AuditConfig()
        self._key = signing_key
        self._lock = threading.Lock()  # the chain and the file; policy reloads write from a worker thread
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._failed: str | None = None
        self._seq, self._head = -1, GENESIS
        self._end = -1  # where our last write ended; anything else means another writer appended
        self._unsigned = 0
        self._last_sign = self._last_sync = time.monotonic()
        self._dirty = False  # written but not fsynced
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        # Group commit (fsync "always"): records submitted and not yet written, in order, and the
        # thread that writes and fsyncs each group. The queue has its own lock so that submitting
        # never waits for an fsync in progress.
        self._queue: list[_Waiting] = []
        self._queued = threading.Condition(threading.Lock())
        self._committer: threading.Thread | None = None
        # Called once, with the reason, when the log fails (the gateway stops reporting SERVING).
        self.on_failure: Callable[[str], None] | None = None
        # Called (with the lock held: it must only wake someone) after a head is signed or the log
        # rotated: the archiver (gateway/archive.py) ships what changed.
        self.on_change: Callable[[], None] | None = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            with self._locked():
                legacy = _set_aside_legacy(path)
                self._open()
        except (OSError, ValueError, KeyError) as exc:  # unwritable, or a last record that isn't one
            why = exc.strerror if isinstance(exc, OSError) else f"unreadable last record: {exc!r}"
            raise UnavailableError(
                f"audit log {path} cannot be opened ({why})", reason="AUDIT_UNAVAILABLE"
            ) from exc
        if legacy is not None:  # the new chain starts by naming what came before it
            self.record("audit_legacy_set_aside", **legacy)
        # A quiet log still gets its last records fsynced and signed on time: a background thread.
        periods = [self.config.sign_every_seconds if self._key is not None else 0.0]
        periods.append(self.config.fsync_interval_seconds if self.config.fsync == "interval" else 0.0)
        if any(p > 0 for p in periods):
            period = min(p for p in periods if p > 0)
            self._timer = threading.Thread(target=self._keep, args=(period,), name="audit-sync", daemon=True)
            self._timer.start()

    # --- writing ---------------------------------------------------------------------------------

    def record(self, event: str, **fields: Any) -> None:
        """Append one record: written, and fsynced as `audit.fsync` says, when this returns."""
        entry = _entry(event, fields)
        if self.path is None:
            _log.info(json.dumps(_fit({"ts": entry[0], "event": entry[1], **entry[2]}, MAX_RECORD_BYTES - 1)))
            return
        self._write_now(entry)

    def submit(self, event: str, **fields: Any) -> Awaitable[None] | None:
        """Append the record of a decision about to take effect, from the event loop, and say what to
        await before it does: None when it is written already (as `record` writes it), or (fsync
        "always") a future done once it is written and fsynced with the others of its group, or
        failed with `UnavailableError` like `record`. A caller cancelled while it waits loses
        nothing: the record is written all the same."""
        entry = _entry(event, fields)
        if self.path is None:
            self.record(event, **fields)
            return None
        if self.config.fsync != "always" or self._stop.is_set():
            self._write_now(entry)  # one write; grouping it would cost the caller an event-loop turn
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_now(entry)
            return None
        if self._failed is not None:
            self._refuse_if_failed()
        future = loop.create_future()
        with self._queued:
            self._queue.append((entry, future, loop))
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._commit_groups, name="audit-commit", daemon=True
                )
                self._committer.start()
            self._queued.notify()
        return future

    def sign(self, reason: str = "requested") -> None:
        """Sign the current chain head now (no-op without a key or when nothing is unsigned)."""
        if self.path is None or self._key is None:
            return
        with self._lock:
            waiting = self._take_queue()
            try:
                self._refuse_if_failed()
                try:
                    with self._locked():
                        self._append([w[0] for w in waiting])
                        self._sign(reason)
                except (OSError, ValueError) as exc:
                    self._fail(exc)
            except UnavailableError as exc:
                _settle(waiting, exc)
                raise
            _settle(waiting, None)

    def close(self) -> None:
        self._stop.set()
        with self._queued:
            self._queued.notify()
        for thread in (self._timer, self._committer):
            if thread is not None:
                thread.join(timeout=5)
        with self._lock:
            waiting = self._take_queue()
            if self._fd is not None and self._failed is None:
                try:
                    with self._locked():
                        self._append([w[0] for w in waiting])
                        self._sign("close")
                        os.fsync(self._fd)
                    _settle(waiting, None)
                except (OSError, ValueError) as exc:
                    _log.error("audit log: final signature failed: %s", getattr(exc, "strerror", None) or exc)
                    _settle(waiting, UnavailableError("audit log unavailable", reason="AUDIT_UNAVAILABLE"))
            else:
                _settle(waiting, UnavailableError("audit log unavailable", reason="AUDIT_UNAVAILABLE"))
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None

    # --- internals (called with self._lock held) ---------------------------------------------------

    def _write_now(self, entry: _Entry) -> None:
        """Write `entry` now, after whatever was submitted before it (in one write with them)."""
        with self._lock:
            waiting = self._take_queue()
            try:
                self._write([*(w[0] for w in waiting), entry])
            except UnavailableError as exc:
                _settle(waiting, exc)
                raise
            _settle(waiting, None)

    def _take_queue(self) -> list[_Waiting]:
        with self._queued:
            waiting, self._queue = self._queue, []
        return waiting

    def _commit_groups(self) -> None:
        """The committer (fsync "always"): whatever was submitted while the previous group was being
        written and fsynced is the next group, written in one write and fsynced once."""
        while True:
            with self._queued:
                while not self._queue and not self._stop.is_set():
                    self._queued.wait()
                if not self._queue:
                    return  # stopping, and nothing left (close() writes what comes after)
            with self._lock:  # taken before the queue: groups reach the file in the order submitted
                waiting = self._take_queue()
                error: UnavailableError | None = None
                try:
                    self._write([w[0] for w in waiting])
                except UnavailableError as exc:
                    error = exc
            _settle(waiting, error)

    def _write(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        self._refuse_if_failed()
        try:
            with self._locked():
                self._append(entries)
                self._maybe_sign()
                self._maybe_rotate()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def _locked(self) -> _FileLock:
        assert self._lock_fd is not None  # only called for file-backed logs
        return _FileLock(self._lock_fd)

    def _open(self) -> None:
        assert self.path is not None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._resume()

    def _resume(self) -> None:
        """Continue the chain from the last record on disk (ours or another writer's)."""
        assert self.path is not None and self._fd is not None
        for segment in reversed(segments(self.path)):
            line = _last_line(segment)
            if line is not None:
                last = json.loads(line)
                self._seq, self._head = int(last["seq"]), str(last["hash"])
                break
        self._end = os.fstat(self._fd).st_size

    def _append(self, entries: list[_Entry]) -> None:
        """Chain `entries` after the last record on disk and write them in one write; fsync once when
        the policy says so. Called with the file lock held."""
        if not entries:
            return
        assert self.path is not None and self._fd is not None
        # Another writer on this path always appends before it rotates, so a file that is still
        # as long as we left it was neither appended to nor rotated: one fstat is enough.
        if os.fstat(self._fd).st_size != self._end:
            if os.fstat(self._fd).st_ino != _inode(self.path):  # another writer rotated the file
                self._open()
            else:  # another writer appended
                self._resume()
        seq, head, lines = self._seq, self._head, []
        for ts, event, fields in entries:
            seq += 1
            body = _encode({"seq": seq, "ts": ts, "event": event, **fields, "prev": head})
            head = hashlib.sha256(body).hexdigest()  # of the encoding itself: the hash goes last
            lines.append(body[:-1] + b',"hash":"' + head.encode() + b'"}\n')
        _write_all(self._fd, lines, self._end, "the log")
        self._seq, self._head = seq, head
        self._end += sum(len(line) for line in lines)  # under the lock, at the end we had just checked
        self._unsigned += len(lines)
        self._dirty = True
        now = time.monotonic()
        if self.config.fsync == "always" or (
            self.config.fsync == "interval" and now - self._last_sync >= self.config.fsync_interval_seconds
        ):
            self._sync(now)

    def _sync(self, now: float) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        self._last_sync, self._dirty = now, False

    def _maybe_sign(self) -> None:
        every = self.config.sign_every_records
        if every > 0 and self._unsigned >= every:
            self._sign("periodic")

    def _sign(self, reason: str) -> None:
        if self._key is None or self._unsigned == 0 or self.path is None or self._fd is None:
            return
        self._sync(time.monotonic())  # a signature must never point at records the disk doesn't hold
        entry = {
            "seq": self._seq,
            "hash": self._head,
            "ts": round(time.time(), 6),
            "reason": reason,
            "key_id": key_id(self._key.public_key()),
            "sig": base64.b64encode(self._key.sign(signed_message(self._seq, self._head))).decode(),
        }
        fd = os.open(f"{self.path}.sig", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_whole(fd, canonical(entry) + b"\n", os.fstat(fd).st_size, "the signature file")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._unsigned = 0
        self._last_sign = time.monotonic()
        if self.on_change is not None:
            self.on_change()
        # The operational log, shipped off the host, is a second witness: with it, cutting records
        # and their signatures off the end together is caught too.
        _log.info(
            "audit chain head signed: seq %s head %s key %s", entry["seq"], entry["hash"], entry["key_id"]
        )

    def _maybe_rotate(self) -> None:
        assert self.path is not None
        if self.config.rotate_bytes <= 0 or self._end < self.config.rotate_bytes:
            return
        self._sign("rotation")
        rotated = segments(self.path)[:-1]
        number = int(rotated[-1].name.rsplit(".", 1)[-1]) + 1 if rotated else 1
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{number}"))
        self._open()  # the next record chains to the rotated file's last one
        if self.on_change is not None:
            self.on_change()

    def _keep(self, period: float) -> None:
        config = self.config
        while not self._stop.wait(period):
            with self._lock:
                if self._failed is not None or self._fd is None:
                    continue
                now = time.monotonic()
                try:
                    with self._locked():
                        if (
                            self._dirty
                            and config.fsync == "interval"
                            and (now - self._last_sync >= config.fsync_interval_seconds)
                        ):
                            self._sync(now)
                        if self._key is not None and 0 < config.sign_every_seconds <= now - self._last_sign:
                            self._sign("periodic")
                except OSError as exc:
                    self._fail(exc, raise_=False)

    def _refuse_if_failed(self) -> None:
        if self._failed is not None:
            raise UnavailableError("audit log unavailable", reason="AUDIT_UNAVAILABLE")

    def _fail(self, exc: Exception, *, raise_: bool = True) -> None:
        # Sticky: after a failed write the chain on disk is in an unknown state, so every later
        # decision is refused too until an operator has looked (and restarted the gateway).
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        first, self._failed = self._failed is None, why
        _log.error(
            "audit log unavailable: %s (%s); refusing every call until it is fixed and the gateway restarted",
            why,
            self.path,
        )
        if first and self.on_failure is not None:
            self.on_failure(why)
        if raise_:
            raise UnavailableError("audit log unavailable", reason="AUDIT_UNAVAILABLE") from exc


def _entry(event: str, fields: dict[str, Any]) -> _Entry:
    """A record's own part, bounded and timed as its caller made it."""
    if RESERVED & fields.keys():
        raise ValueError(f"audit fields may not be named {sorted(RESERVED & fields.keys())}")
    bounded_fields = {
        (name if type(name) is str and len(name) <= MAX_STRING_CHARS else str(bounded(name))): _field(value)
        for name, value in fields.items()
    }
    return round(time.time(), 6), str(_field(event)), bounded_fields


def _settle(waiting: list[_Waiting], error: UnavailableError | None) -> None:
    """Tell each waiting caller, on its own loop, that its group was written (or failed)."""
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for _, future, loop in waiting:
        loops.setdefault(loop, []).append(future)
    for loop, futures in loops.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, futures, error)


def _resolve(futures: list[asyncio.Future[None]], error: UnavailableError | None) -> None:
    for future in futures:
        if not future.done():  # a caller that went away cancelled its own
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(UnavailableError("audit log unavailable", reason="AUDIT_UNAVAILABLE"))


class _FileLock:
    """flock on the log's lock file: several gateway processes may share one audit path."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key
