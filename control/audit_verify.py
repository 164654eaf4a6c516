"""Offline verification of an audit trail (`airlock audit verify`).

Walks every file of a log in order and checks each record's hash, its `seq` (no gap, no reorder)
and its `prev` link (the chain continues across rotated files), then every chain-head signature in
the sidecar: a valid Ed25519 signature by a trusted key over a head that the log still holds. A
signature that points past the end of the log means records were cut off the end.

Records and the signatures after them can be rewritten or cut off together; what catches that is
outside the files: a head exported earlier (`airlock audit head`, `HEAD_FORMAT`) that the log must
still hold, records no signature covers (all of them with `require_signed`, or those older than the
gateway's signing period allows), and the signed heads in the gateway's operational log.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit import GENESIS, HEAD_FORMAT, key_id, record_hash, segments, signed_message
from serving.bundle import BundleError, load_trusted_keys

__all__ = [
    "HEAD_FORMAT",
    "ArchivedHead",
    "Head",
    "Report",
    "archived_heads",
    "head_document",
    "load_head",
    "load_public_key",
    "load_public_keys",
    "logs_in",
    "verify_log",
]

Keys = ed25519.Ed25519PublicKey | dict[str, ed25519.Ed25519PublicKey]
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Head:
    """A signed chain head exported by `airlock audit head`: the log must still hold it."""

    log: str  # the log's file name
    seq: int
    hash: str
    ts: float  # when the gateway signed it
    key_id: str
    sig: str  # base64 Ed25519 over `signed_message(seq, hash)`

    def document(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "log": self.log, "seq": self.seq, "hash": self.hash,
                "ts": self.ts, "key_id": self.key_id, "sig": self.sig}  # fmt: skip


def load_head(path: Path) -> Head:
    """Read a head document; ValueError says what is wrong with it."""
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}: not an audit head ({HEAD_FORMAT})")
    try:
        head = Head(str(doc["log"]), doc["seq"], str(doc["hash"]), float(doc["ts"]),
                    str(doc["key_id"]), str(doc["sig"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: audit head field {exc} missing or invalid") from None
    if not isinstance(head.seq, int) or isinstance(head.seq, bool) or head.seq < 0:
        raise ValueError(f"{path}: audit head seq must be an integer >= 0")
    if not _HEX64.fullmatch(head.hash):
        raise ValueError(f"{path}: audit head hash must be 64 hex digits")
    return head


def head_document(report: Report) -> dict[str, Any] | None:
    """The JSON `airlock audit head` prints for a verified log: its last signed head (None: none)."""
    return report.signed_head.document() if report.signed_head is not None else None


@dataclass(frozen=True)
class ArchivedHead:
    """A head the archive holds (`gateway/archive.py`): seq and hash from its object's name; its
    document is fetched only when the local log disagrees with it (to tell forged from genuine)."""

    seq: int
    hash: str
    where: str  # s3://bucket/key
    fetch: Callable[[], bytes]


_HEAD_NAME = re.compile(r"(\d{20})-([0-9a-f]{64})\.json")


def archived_heads(listing: list[tuple[str, str]], where: str, fetch: Callable[[str, str], bytes]
                   ) -> tuple[list[ArchivedHead], list[str]]:  # fmt: skip
    """The heads in an archive listing of (key, version id), and the objects that are not heads."""
    heads, strays = [], []
    for key, version in listing:
        found = _HEAD_NAME.fullmatch(key.rsplit("/", 1)[-1])
        if found is None:
            strays.append(key)
            continue
        heads.append(ArchivedHead(int(found.group(1)), found.group(2), f"{where}/{key}",
                                  functools.partial(fetch, key, version)))  # fmt: skip
    return heads, strays


@dataclass
class Report:
    log: Path
    files: int = 0
    records: int = 0
    signatures: int = 0
    last_signed_seq: int = -1
    last_seq: int = -1
    signed_head: Head | None = None  # the signature covering last_signed_seq
    archived_heads: int = 0  # heads of the archive the log was checked against
    first_unsigned_ts: float | None = None  # when the oldest record no signature covers was written
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        """Records after the last signature: chained, but not yet covered by a signature."""
        return self.last_seq - self.last_signed_seq


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def load_public_keys(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file, by key id: the current key and the ones it replaced."""
    try:
        return load_trusted_keys(path)
    except BundleError as exc:
        raise ValueError(str(exc)) from None


def logs_in(directory: Path) -> list[Path]:
    """The logs in a directory: each active `*.jsonl` file (its rotated files come with it)."""
    return sorted(p for p in directory.glob("*.jsonl") if p.is_file())


def verify_log(
    path: Path,
    keys: Keys | None,
    *,
    require_signed: bool = False,
    unsigned_grace: float | None = None,
    expect_head: Head | None = None,
    archived: Sequence[ArchivedHead] = (),
    now: float | None = None,
) -> Report:
    """Check one log (all its files) and, with keys, its signatures; `Report.problems` says what broke.

    `keys`: one public key, or several by key id (signatures made before a key rotation).
    With keys, also a problem: with `require_signed`, any record no signature covers; with
    `unsigned_grace`, one that was written more than that many seconds before `now` (default: the
    time now); with `expect_head`, a log that doesn't hold that head (rewritten, or cut off); with
    `archived`, a log that doesn't hold every genuine head of the archive (its WORM copy)."""
    report = Report(path)
    hashes: dict[int, str] = {}
    times: list[float] = []
    expected_seq, prev = 0, GENESIS
    for segment in segments(path):
        report.files += 1
        data = segment.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]  # a partial last line is reported after the rest is checked
        for number, raw in enumerate(whole.splitlines(), start=1):
            where = f"{segment}:{number}"
            record = _parse(raw, where, report)
            if record is None:
                return report  # the chain can't be followed past an unreadable line
            seq = record.get("seq")
            if record.get("hash") != record_hash(record):
                report.problems.append(f"{where}: record seq {seq} was modified (its hash does not match)")
            if seq != expected_seq:
                what = "deleted" if isinstance(seq, int) and seq > expected_seq else "reordered or repeated"
                report.problems.append(
                    f"{where}: expected seq {expected_seq}, found {seq}: records were {what}"
                )
            elif record.get("prev") != prev:
                report.problems.append(f"{where}: seq {seq} does not chain to the record before it")
            if report.problems:
                return report  # one break is enough to fail; later lines would only repeat it
            hashes[expected_seq] = prev = str(record["hash"])
            ts = record.get("ts")
            times.append(float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else 0.0)
            expected_seq += 1
            report.records += 1
        if whole != data:
            report.problems.append(f"{segment}: ends in a partial record (the file was truncated)")
            return report
    report.last_seq = expected_seq - 1
    if keys is not None:
        trusted = keys if isinstance(keys, dict) else {key_id(keys): keys}
        _check_signatures(path, trusted, hashes, report)
        if report.unsigned_tail > 0:
            report.first_unsigned_ts = times[report.last_signed_seq + 1]
        if expect_head is not None:
            _check_head(expect_head, trusted, hashes, report)
        _check_archived(archived, trusted, hashes, report)
        _check_unsigned(report, require_signed, unsigned_grace, time.time() if now is None else now)
    return report


def _check_head(head: Head, trusted: dict[str, ed25519.Ed25519PublicKey], hashes: dict[int, str],
                report: Report) -> None:  # fmt: skip
    """The log must still hold a head exported earlier: same hash at the same seq."""
    where = f"expected head (seq {head.seq} of {head.log})"
    public_key = trusted.get(head.key_id)
    try:
        if public_key is None:
            raise InvalidSignature
        public_key.verify(base64.b64decode(head.sig, validate=True), signed_message(head.seq, head.hash))
    except (InvalidSignature, ValueError, binascii.Error):
        report.problems.append(f"{where}: not signed by a trusted key; it proves nothing")
        return
    if head.seq > report.last_seq:
        report.problems.append(
            f"{report.log}: the log ends at seq {report.last_seq} but held seq {head.seq} when its "
            "head was exported: records were removed from the end (truncated)"
        )
    elif hashes.get(head.seq) != head.hash:
        report.problems.append(
            f"{report.log}: the record at seq {head.seq} is not the one the {where} vouches for: "
            f"the log was rewritten at or before seq {head.seq}"
        )


def _check_archived(archived: Sequence[ArchivedHead], trusted: dict[str, ed25519.Ed25519PublicKey],
                    hashes: dict[int, str], report: Report) -> None:  # fmt: skip
    """The log must hold every head the archive holds. The names say which (seq, hash) they are;
    only a head the log disagrees with is fetched, and it counts only if a trusted key signed it: a
    genuine one proves the log was cut or rewritten after it was archived, whatever the log's own
    signatures say (they can be removed or made again with a key taken from the host)."""
    report.archived_heads = len(archived)
    for entry in sorted(archived, key=lambda h: -h.seq):  # the latest first: a truncation shows there
        if hashes.get(entry.seq) == entry.hash:
            continue
        try:
            doc = json.loads(entry.fetch())
            head = Head(str(doc["log"]), int(doc["seq"]), str(doc["hash"]), float(doc["ts"]),
                        str(doc["key_id"]), str(doc["sig"]))  # fmt: skip
        except Exception as exc:  # unreadable, or the store failed on it: the head proves nothing
            report.problems.append(f"{entry.where}: archived head unreadable ({type(exc).__name__})")
            continue
        if (head.seq, head.hash) != (entry.seq, entry.hash):
            report.problems.append(
                f"{entry.where}: the archived head's document is not the one its name says"
            )
            continue
        before = len(report.problems)
        _check_head(head, trusted, hashes, report)
        for i in range(before, len(report.problems)):
            report.problems[i] = (
                report.problems[i]
                .replace(f"expected head (seq {head.seq} of {head.log})", f"archived head {entry.where}")
                .replace("when its head was exported", "when its head was archived")
            )
        if len(report.problems) - before and report.problems[-1].endswith("it proves nothing"):
            report.problems[-1] += " (a forged object in the archive)"


def _check_unsigned(report: Report, require_signed: bool, grace: float | None, now: float) -> None:
    """Records no signature covers: refused outright with `require_signed`, else once older than
    the gateway's signing period allows (`grace`): a tail rewritten with its signatures removed."""
    if report.unsigned_tail <= 0 or report.problems:
        return
    first = report.last_signed_seq + 1
    span = f"{report.unsigned_tail} record(s) from seq {first} on"
    if require_signed:
        report.problems.append(f"{report.log}: {span} are covered by no signature (--require-signed)")
    elif (
        grace is not None and report.first_unsigned_ts is not None and now - report.first_unsigned_ts > grace
    ):
        age = now - report.first_unsigned_ts
        report.problems.append(
            f"{report.log}: {span} are covered by no signature, and seq {first} was written {age:.0f} s "
            f"ago (a running gateway signs within {grace:.0f} s): signatures were removed, or the "
            "gateway stopped without signing (killed)"
        )


def _parse(raw: bytes, where: str, report: Report) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        report.problems.append(f"{where}: not a JSON record (modified or truncated)")
        return None
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
        report.problems.append(f"{where}: not an audit record")
        return None
    return record


def _check_signatures(
    path: Path, trusted: dict[str, ed25519.Ed25519PublicKey], hashes: dict[int, str], report: Report
) -> None:
    sidecar = path.with_name(f"{path.name}.sig")
    lines = sidecar.read_bytes().splitlines() if sidecar.exists() else []
    for number, raw in enumerate(lines, start=1):
        where = f"{sidecar}:{number}"
        try:
            entry = json.loads(raw)
            seq, head, signed_at = int(entry["seq"]), str(entry["hash"]), float(entry.get("ts", 0.0))
            signature = base64.b64decode(entry["sig"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            report.problems.append(f"{where}: not a signature record")
            continue
        public_key = trusted.get(str(entry.get("key_id")))
        if public_key is None:
            signer, known = entry.get("key_id"), ", ".join(sorted(trusted))
            report.problems.append(f"{where}: signed by key {signer}, not a trusted one ({known})")
            continue
        try:
            public_key.verify(signature, signed_message(seq, head))
        except InvalidSignature:
            report.problems.append(f"{where}: bad signature over seq {seq}")
            continue
        if seq > report.last_seq:
            report.problems.append(
                f"{where}: a signature covers seq {seq} but the log ends at seq {report.last_seq}: "
                "records were removed from the end (truncated)"
            )
            continue
        if hashes.get(seq) != head:
            report.problems.append(f"{where}: signed head of seq {seq} does not match the log")
            continue
        report.signatures += 1
        if seq > report.last_signed_seq:
            report.last_signed_seq = seq
            report.signed_head = Head(
                path.name, seq, head, signed_at, str(entry["key_id"]), str(entry["sig"])
            )
    if report.records and not report.signatures and not report.problems:
        report.problems.append(f"{sidecar}: no valid signature covers any record")
