"""Rewriting the audit trail's tail and deleting the signatures after the edit, or cutting records
off the end together with their signatures: each must fail `airlock audit verify`.

A chain alone can't catch either (the attacker recomputes every hash after the edit), and before
`--require-signed`, `--expect-head` and the age check of unsigned records, verify answered 0 with a
count of unsigned records. Each attack here is run against each mode that must catch it.
"""

from __future__ import annotations

import base64
import json
import time
import types
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from control.cli import main
from gateway import audit as audit_mod
from gateway.audit import AuditLog, record_hash, signed_message
from gateway.config import AuditConfig

KEY = ed25519.Ed25519PrivateKey.generate()
RECORDS = 20
EVERY = 5  # a signature every 5 records: heads at seq 4, 9, 14, 19
OLD = 2 * 3600.0  # records written this long ago are far past the default config's signing period


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    path = tmp_path / "audit-signing.pub"
    path.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def write_log(path: Path, monkeypatch: pytest.MonkeyPatch, *, age: float = 0.0) -> None:
    """RECORDS authorization records, signed every EVERY records, written `age` seconds ago."""
    clock = types.SimpleNamespace(time=lambda: time.time() - age, monotonic=time.monotonic)
    with monkeypatch.context() as patch:
        patch.setattr(audit_mod, "time", clock)
        log = AuditLog(
            path, config=AuditConfig(sign_every_records=EVERY, sign_every_seconds=0), signing_key=KEY
        )
        for i in range(RECORDS):
            log.record("authorization", decision="deny", subject=f"acme/u{i}", tenant="acme")
        log.close()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def signatures(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(f"{path}.sig").read_text().splitlines()]


def rewrite(path: Path, seq: int, **changes: Any) -> None:
    """The attack: change record `seq`, recompute its hash and every later one's (so the chain is
    whole again), and delete every signature the edit invalidated (those at or after `seq`)."""
    chain = records(path)
    chain[seq].update(changes)
    for i in range(seq, len(chain)):
        if i > 0:
            chain[i]["prev"] = chain[i - 1]["hash"]
        chain[i]["hash"] = record_hash(chain[i])
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in chain))
    kept = [s for s in signatures(path) if s["seq"] < seq]
    Path(f"{path}.sig").write_text("".join(json.dumps(s) + "\n" for s in kept))


def truncate(path: Path, keep: int) -> None:
    """The other attack: cut every record from seq `keep` on, and the signatures covering them."""
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:keep]))
    kept = [s for s in signatures(path) if s["seq"] < keep]
    Path(f"{path}.sig").write_text("".join(json.dumps(s) + "\n" for s in kept))


def verify(capsys: pytest.CaptureFixture[str], path: Path, pub: Path, *flags: str) -> tuple[int, str]:
    # The built-in default configuration: audit.sign_every_seconds = 60.
    code = main(
        ["audit", "verify", "--file", str(path), "--key", str(pub), "--state-dir", str(path.parent), *flags]
    )
    out = capsys.readouterr()
    return code, out.out + out.err


def export_head(capsys: pytest.CaptureFixture[str], path: Path, pub: Path) -> tuple[int, str]:
    code = main(["audit", "head", "--file", str(path), "--key", str(pub), "--state-dir", str(path.parent)])
    out = capsys.readouterr()
    return code, out.out


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "gateway.jsonl"


def test_a_rewritten_tail_with_its_signatures_deleted_fails_by_default(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log, monkeypatch, age=OLD)
    assert verify(capsys, log, pub)[0] == 0
    rewrite(log, 12, decision="allow")
    code, out = verify(capsys, log, pub)
    assert code == 1, out  # was 0, with "10 record(s) after the last signature"
    assert "10 record(s) from seq 10 on are covered by no signature" in out
    assert "signatures were removed" in out


def test_require_signed_fails_a_rewritten_tail_however_recent(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log, monkeypatch)  # just written: a running gateway's unsigned tail looks the same
    rewrite(log, 12, decision="allow")
    code, out = verify(capsys, log, pub)
    assert code == 0, out  # recent unsigned records are normal without the flag
    code, out = verify(capsys, log, pub, "--require-signed")
    assert code == 1, out
    assert "(--require-signed)" in out


def test_expect_head_fails_a_rewritten_log(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_log(log, monkeypatch)
    code, document = export_head(capsys, log, pub)
    assert code == 0
    head = tmp_path / "head.json"
    head.write_text(document)
    rewrite(log, 7, decision="allow")
    code, out = verify(capsys, log, pub, "--expect-head", str(head))
    assert code == 1, out
    assert "the log was rewritten at or before seq 19" in out


def test_expect_head_catches_a_truncated_tail_the_other_modes_cant(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_log(log, monkeypatch, age=OLD)
    head = tmp_path / "head.json"
    head.write_text(export_head(capsys, log, pub)[1])
    truncate(log, 15)  # seq 15..19 and the signature over 19 are gone; 0..14 are still signed
    assert verify(capsys, log, pub)[0] == 0
    assert verify(capsys, log, pub, "--require-signed")[0] == 0
    code, out = verify(capsys, log, pub, "--expect-head", str(head))
    assert code == 1, out
    assert "the log ends at seq 14 but held seq 19" in out


def test_an_untampered_log_passes_every_mode(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_log(log, monkeypatch, age=OLD)
    head = tmp_path / "head.json"
    head.write_text(export_head(capsys, log, pub)[1])
    write_log(log, monkeypatch)  # the gateway went on writing (and signing) after the export
    code, out = verify(capsys, log, pub, "--require-signed", "--expect-head", str(head))
    assert code == 0, out
    assert f"OK {log}: {2 * RECORDS} record(s)" in out


def test_an_old_unsigned_tail_fails_by_default_however_it_came_about(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log, monkeypatch, age=OLD)
    sidecar = Path(f"{log}.sig")
    sidecar.write_text("".join(line + "\n" for line in sidecar.read_text().splitlines()[:-1]))
    code, out = verify(capsys, log, pub)  # the last signature deleted, nothing rewritten
    assert code == 1 and "5 record(s) from seq 15 on" in out


def test_audit_head_is_a_small_stable_signed_document(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log, monkeypatch)
    code, document = export_head(capsys, log, pub)
    assert code == 0
    head = json.loads(document)
    assert set(head) == {"format", "log", "seq", "hash", "ts", "key_id", "sig"}
    last = records(log)[-1]
    assert (head["format"], head["log"], head["seq"], head["hash"]) == (
        "airlock-audit-head/1",
        "gateway.jsonl",
        last["seq"],
        last["hash"],
    )
    KEY.public_key().verify(base64.b64decode(head["sig"]), signed_message(head["seq"], head["hash"]))
    assert len(document) < 400


def test_audit_head_refuses_a_log_that_does_not_verify(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log, monkeypatch)
    log.write_text(log.read_text().replace('"decision":"deny"', '"decision":"allow"', 1))
    code = main(["audit", "head", "--file", str(log), "--key", str(pub), "--state-dir", str(log.parent)])
    out = capsys.readouterr()
    assert code == 1 and out.out == ""
    assert "does not verify" in out.err


def test_a_forged_or_malformed_expected_head_is_refused(
    log: Path, pub: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_log(log, monkeypatch)
    head = json.loads(export_head(capsys, log, pub)[1])
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**head, "sig": base64.b64encode(b"\0" * 64).decode()}))
    code, out = verify(capsys, log, pub, "--expect-head", str(forged))
    assert code == 1 and "not signed by a trusted key" in out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**head, "log": "elsewhere.jsonl"}))
    code, out = verify(capsys, log, pub, "--expect-head", str(other))
    assert code == 1 and "not among the logs verified" in out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**head, "seq": "19"}))
    assert verify(capsys, log, pub, "--expect-head", str(broken))[0] == 2
