"""Offline verification of an audit trail (`airlock audit verify`).

Walks every file of a log in order and checks each record's hash, its `seq` (no gap, no reorder)
and its `prev` link (the chain continues across rotated files), then every chain-head signature in
the sidecar: a valid Ed25519 signature by a trusted key over a head that the log still holds. A
signature that points past the end of the log means records were cut off the end.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from airlock.bundle import BundleError, load_trusted_keys
from gateway.audit import GENESIS, key_id, record_hash, segments, signed_message

__all__ = ["Report", "load_public_key", "load_public_keys", "logs_in", "verify_log"]

Keys = ed25519.Ed25519PublicKey | dict[str, ed25519.Ed25519PublicKey]


@dataclass
class Report:
    log: Path
    files: int = 0
    records: int = 0
    signatures: int = 0
    last_signed_seq: int = -1
    last_seq: int = -1
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


def verify_log(path: Path, keys: Keys | None) -> Report:
    """Check one log (all its files) and, with keys, its signatures; `Report.problems` says what broke.

    `keys`: one public key, or several by key id (signatures made before a key rotation)."""
    report = Report(path)
    hashes: dict[int, str] = {}
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
            expected_seq += 1
            report.records += 1
        if whole != data:
            report.problems.append(f"{segment}: ends in a partial record (the file was truncated)")
            return report
    report.last_seq = expected_seq - 1
    if keys is not None:
        trusted = keys if isinstance(keys, dict) else {key_id(keys): keys}
        _check_signatures(path, trusted, hashes, report)
    return report


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
            seq, head = int(entry["seq"]), str(entry["hash"])
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
        report.last_signed_seq = max(report.last_signed_seq, seq)
    if report.records and not report.signatures and not report.problems:
        report.problems.append(f"{sidecar}: no valid signature covers any record")
