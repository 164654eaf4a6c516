"""The audit trail: chained records, signed heads, rotation, fsync policy, failing closed, and
`verify_log` catching each kind of tampering (modified, deleted, reordered, truncated, bad signature)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from airlock.errors import UnavailableError
from control.audit_verify import verify_log
from gateway.audit import GENESIS, MAX_RECORD_BYTES, MAX_STRING_CHARS, AuditLog, record_hash
from gateway.config import AuditConfig
from serving.bundle import key_id

KEY = ed25519.Ed25519PrivateKey.generate()
PUB = KEY.public_key()


def write_log(path: Path, count: int, *, config: AuditConfig | None = None) -> None:
    log = AuditLog(path, config=config or AuditConfig(sign_every_seconds=0), signing_key=KEY)
    for i in range(count):
        log.record("authorization", decision="allow", subject=f"acme/u{i}", tenant="acme")
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def problems(path: Path, key: ed25519.Ed25519PublicKey = PUB) -> list[str]:
    return verify_log(path, key).problems


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "gateway.jsonl"


def test_records_are_chained_and_the_head_signed_at_close(log_path: Path) -> None:
    write_log(log_path, 5)
    records = [json.loads(line) for line in lines(log_path)]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    assert all(r["hash"] == record_hash(r) for r in records)
    [signature] = [json.loads(line) for line in lines(log_path.with_name("gateway.jsonl.sig"))]
    assert (signature["seq"], signature["hash"], signature["reason"]) == (4, records[-1]["hash"], "close")
    report = verify_log(log_path, PUB)
    assert report.ok, report.problems
    assert (report.records, report.signatures, report.last_signed_seq) == (5, 1, 4)
    assert oct(log_path.stat().st_mode & 0o777) == "0o600"


def test_a_reopened_log_continues_the_chain(log_path: Path) -> None:
    write_log(log_path, 3)
    write_log(log_path, 2)
    assert [json.loads(line)["seq"] for line in lines(log_path)] == [0, 1, 2, 3, 4]
    assert verify_log(log_path, PUB).ok


def test_a_modified_record_is_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    data = log_path.read_bytes().replace(b'"decision":"allow"', b'"decision":"deny"', 1)
    log_path.write_bytes(data)
    [problem] = problems(log_path)
    assert "gateway.jsonl:1: record seq 0 was modified" in problem


def test_a_modified_record_with_a_recomputed_hash_breaks_the_chain(log_path: Path) -> None:
    write_log(log_path, 5)
    rows = lines(log_path)
    forged = json.loads(rows[2])
    forged["decision"] = "deny"
    forged["hash"] = record_hash(forged)
    rows[2] = json.dumps(forged).encode() + b"\n"
    log_path.write_bytes(b"".join(rows))
    assert "seq 3 does not chain" in problems(log_path)[0]


def test_a_deleted_record_is_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    rows = lines(log_path)
    log_path.write_bytes(b"".join(rows[:2] + rows[3:]))
    assert "expected seq 2, found 3: records were deleted" in problems(log_path)[0]


def test_reordered_records_are_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    rows = lines(log_path)
    rows[1], rows[2] = rows[2], rows[1]
    log_path.write_bytes(b"".join(rows))
    assert "expected seq 1, found 2" in problems(log_path)[0]


def test_records_cut_off_the_end_are_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    log_path.write_bytes(b"".join(lines(log_path)[:3]))  # whole records gone: the chain alone is fine
    [problem] = problems(log_path)
    assert "covers seq 4 but the log ends at seq 2" in problem and "truncated" in problem


def test_a_record_cut_in_half_is_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    data = log_path.read_bytes()
    log_path.write_bytes(data[: len(data) - 20])
    found = problems(log_path)
    assert any("ends in a partial record" in p for p in found)
    assert verify_log(log_path, None).records == 4  # the intact records before it were checked


def test_the_first_records_cut_off_are_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    log_path.write_bytes(b"".join(lines(log_path)[2:]))
    assert "expected seq 0, found 2" in problems(log_path)[0]


def test_a_bad_signature_is_detected(log_path: Path) -> None:
    write_log(log_path, 5)
    sidecar = log_path.with_name("gateway.jsonl.sig")
    entry = json.loads(sidecar.read_bytes())
    raw = bytearray(base64.b64decode(entry["sig"]))
    raw[0] ^= 1
    entry["sig"] = base64.b64encode(bytes(raw)).decode()
    sidecar.write_text(json.dumps(entry) + "\n")
    found = problems(log_path)
    assert any("bad signature over seq 4" in p for p in found)


def test_a_signature_by_another_key_is_refused(log_path: Path) -> None:
    write_log(log_path, 3)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert any("not a trusted one" in p for p in problems(log_path, other))


def test_signatures_by_a_rotated_key_verify_with_both_keys(log_path: Path) -> None:
    write_log(log_path, 3)
    newer = ed25519.Ed25519PrivateKey.generate()
    log = AuditLog(log_path, config=AuditConfig(sign_every_seconds=0), signing_key=newer)
    log.record("authorization", decision="allow")
    log.close()
    both = {key_id(k.public_key()): k.public_key() for k in (KEY, newer)}
    report = verify_log(log_path, both)
    assert report.ok and report.signatures == 2, report.problems
    assert any("not a trusted one" in p for p in problems(log_path, newer.public_key()))


def test_a_deleted_signature_file_is_detected(log_path: Path) -> None:
    write_log(log_path, 3)
    log_path.with_name("gateway.jsonl.sig").unlink()
    assert any("no valid signature" in p for p in problems(log_path))


def test_heads_are_signed_every_n_records(log_path: Path) -> None:
    write_log(log_path, 7, config=AuditConfig(sign_every_records=3, sign_every_seconds=0))
    sigs = [json.loads(line) for line in lines(log_path.with_name("gateway.jsonl.sig"))]
    assert [(s["seq"], s["reason"]) for s in sigs] == [(2, "periodic"), (5, "periodic"), (6, "close")]
    assert verify_log(log_path, PUB).signatures == 3


def test_heads_are_signed_every_n_seconds(log_path: Path) -> None:
    log = AuditLog(log_path, config=AuditConfig(sign_every_records=0, sign_every_seconds=0.05),
                   signing_key=KEY)  # fmt: skip
    signed = threading.Event()
    log.record("authorization", decision="allow")
    sidecar = log_path.with_name("gateway.jsonl.sig")
    for _ in range(200):  # the timer thread signs on its own; wait for it (generously), no timing claim
        if sidecar.exists() and sidecar.read_bytes():
            signed.set()
            break
        threading.Event().wait(0.05)
    log.close()
    assert signed.is_set()
    assert json.loads(lines(sidecar)[0])["reason"] == "periodic"


def test_rotation_keeps_the_chain_across_files(log_path: Path) -> None:
    write_log(log_path, 30, config=AuditConfig(rotate_bytes=1000, sign_every_seconds=0))
    rotated = sorted(log_path.parent.glob("gateway.jsonl.[0-9]*"))
    assert len(rotated) >= 2
    first_of_second = json.loads(lines(log_path.with_name("gateway.jsonl.2"))[0])
    last_of_first = json.loads(lines(log_path.with_name("gateway.jsonl.1"))[-1])
    assert first_of_second["prev"] == last_of_first["hash"]
    report = verify_log(log_path, PUB)
    assert report.ok, report.problems
    assert report.records == 30 and report.files == len(rotated) + 1
    reasons = [json.loads(line)["reason"] for line in lines(log_path.with_name("gateway.jsonl.sig"))]
    assert reasons.count("rotation") == len(rotated)


def test_a_deleted_rotated_file_is_detected(log_path: Path) -> None:
    write_log(log_path, 30, config=AuditConfig(rotate_bytes=1000, sign_every_seconds=0))
    log_path.with_name("gateway.jsonl.2").unlink()
    assert "records were deleted" in problems(log_path)[0]


@pytest.mark.parametrize(("policy", "expect"), [("always", 4), ("never", 0)])
def test_fsync_policy(log_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, expect: int) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync=policy, sign_every_seconds=0))  # no key: no signing
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    for _ in range(4):
        log.record("authorization", decision="allow")
    assert len(calls) == expect
    monkeypatch.undo()
    log.close()


def test_fsync_interval_syncs_at_most_once_per_interval(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync="interval", fsync_interval_seconds=3600,
                                                 sign_every_seconds=0))  # fmt: skip
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    for _ in range(10):
        log.record("authorization", decision="allow")
    assert calls == []  # the interval has not passed since the log was opened
    monkeypatch.undo()
    log.close()


def test_fsync_interval_catches_up_on_a_quiet_log(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    log = AuditLog(log_path, config=AuditConfig(fsync="interval", fsync_interval_seconds=0.05))
    log.record("authorization", decision="allow")  # the first record: too soon after opening to sync
    synced = threading.Event()
    for _ in range(200):  # no more records come; the background thread must sync on its own
        if calls:
            synced.set()
            break
        threading.Event().wait(0.05)
    log.close()
    assert synced.is_set()


def failing_write(monkeypatch: pytest.MonkeyPatch, log_path: Path) -> Callable[..., Any]:
    real = os.write

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(log_path):
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return real


def test_a_failed_write_fails_closed_and_stays_closed(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(log_path, config=AuditConfig(sign_every_seconds=0), signing_key=KEY)
    log.record("authorization", decision="allow")
    failing_write(monkeypatch, log_path)
    with pytest.raises(UnavailableError) as refused:
        log.record("authorization", decision="allow")
    assert refused.value.reason == "AUDIT_UNAVAILABLE" and "audit log unavailable" in str(refused.value)
    assert "No space left on device" in caplog.text and str(log_path) in caplog.text
    monkeypatch.undo()  # the disk has room again: still refused until an operator restarts
    with pytest.raises(UnavailableError):
        log.record("authorization", decision="allow")
    log.close()
    assert len(lines(log_path)) == 1


def test_an_unopenable_log_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(UnavailableError, match="cannot be opened"):
        AuditLog(tmp_path / "not-a-dir" / "gateway.jsonl")


def test_a_log_ending_in_a_partial_record_refuses_to_start(log_path: Path) -> None:
    write_log(log_path, 2)
    with log_path.open("ab") as fh:
        fh.write(b'{"seq":2,"ev')
    with pytest.raises(UnavailableError, match="partial record"):
        AuditLog(log_path)


def test_a_log_ending_in_a_foreign_line_refuses_to_start(log_path: Path) -> None:
    write_log(log_path, 2)
    with log_path.open("ab") as fh:
        fh.write(b"not json\n")
    with pytest.raises(UnavailableError, match="unreadable last record"):
        AuditLog(log_path)


def test_two_writers_on_one_path_keep_one_chain(log_path: Path) -> None:
    config = AuditConfig(sign_every_records=5, sign_every_seconds=0, rotate_bytes=4000)
    first = AuditLog(log_path, config=config, signing_key=KEY)
    second = AuditLog(log_path, config=config, signing_key=KEY)

    def write(log: AuditLog, who: str) -> None:
        for i in range(40):
            log.record("authorization", decision="allow", subject=f"{who}{i}")

    threads = [
        threading.Thread(target=write, args=(log, name)) for log, name in ((first, "a"), (second, "b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    second.close()
    report = verify_log(log_path, PUB)
    assert report.ok, report.problems
    assert report.records == 80


def test_reserved_field_names_are_refused(log_path: Path) -> None:
    log = AuditLog(log_path)
    with pytest.raises(ValueError, match="seq"):
        log.record("authorization", seq=7)
    log.close()


def test_an_unchained_log_from_an_earlier_version_is_set_aside_and_named(log_path: Path) -> None:
    import hashlib

    log_path.parent.mkdir(parents=True)
    legacy = b'{"ts":1.0,"event":"authorization","decision":"allow"}\n{"ts":2.0,"event":"lockout"}\n'
    log_path.write_bytes(legacy)
    write_log(log_path, 2)
    [kept] = list(log_path.parent.glob("gateway.jsonl.legacy-*"))
    assert kept.read_bytes() == legacy  # kept byte for byte, outside the chain
    first = json.loads(lines(log_path)[0])
    assert first["event"] == "audit_legacy_set_aside" and first["seq"] == 0
    assert (first["file"], first["sha256"], first["records"]) == (
        kept.name,
        hashlib.sha256(legacy).hexdigest(),
        2,
    )
    assert verify_log(log_path, PUB).ok


def test_a_chained_log_is_never_set_aside(log_path: Path) -> None:
    write_log(log_path, 3)
    data = lines(log_path)
    log_path.write_bytes(b"".join(data[:-1]) + b'{"ts":3.0,"event":"forged"}\n')  # chain broken at the end
    with pytest.raises(UnavailableError):
        AuditLog(log_path, config=AuditConfig(sign_every_seconds=0), signing_key=KEY)
    assert not list(log_path.parent.glob("gateway.jsonl.legacy-*"))


# --- bounded records: no caller can make one record (or the disk) large -------------------------


def test_a_huge_string_field_is_cut_and_marked(log_path: Path) -> None:
    log = AuditLog(log_path, config=AuditConfig(sign_every_seconds=0), signing_key=KEY)
    log.record("authorization", resource="model:" + "m" * 1_000_000, subject="acme/u")
    log.close()
    [line] = lines(log_path)
    assert len(line) <= MAX_RECORD_BYTES
    record = json.loads(line)
    assert record["resource"].startswith("model:" + "m" * (MAX_STRING_CHARS - 6))
    assert record["resource"].endswith(f"...[{1_000_006 - MAX_STRING_CHARS} more characters]")
    assert record["subject"] == "acme/u"
    assert verify_log(log_path, PUB).ok


@pytest.mark.parametrize(
    "fields",
    [
        {"items": list(range(10_000))},
        {"nested": {f"k{i}": "v" * 300 for i in range(1000)}},
        {"deep": [[[[[["x" * 10_000]]]]]]},
        {"big": 10**5000, "small": -(10**40)},
        {"unicode": "\u2028\U0001f600" * 5000},  # escaped to 6 or 12 bytes each in canonical JSON
        {f"f{i}": "y" * 250 for i in range(200)},  # many fields, each under the string bound
        {"set": {"a", "b"}, "bytes": b"\x00" * 5000, "obj": object()},
    ],
)
def test_no_record_exceeds_the_record_bound(log_path: Path, fields: dict[str, Any]) -> None:
    log = AuditLog(log_path, config=AuditConfig(sign_every_seconds=0), signing_key=KEY)
    log.record("authorization", decision="deny", **fields)
    log.record("authorization", decision="allow")
    log.close()
    records = lines(log_path)
    assert len(records) == 2 and all(len(line) <= MAX_RECORD_BYTES for line in records)
    first = json.loads(records[0])
    assert first["event"] == "authorization" and first["decision"] == "deny"  # small fields survive
    assert verify_log(log_path, PUB).ok


def test_too_many_fields_to_mark_one_by_one_leave_a_count(log_path: Path) -> None:
    log = AuditLog(log_path, config=AuditConfig(sign_every_seconds=0), signing_key=KEY)
    log.record("flood", **{f"field{i:04d}": i for i in range(2000)})
    log.close()
    [line] = lines(log_path)
    assert len(line) <= MAX_RECORD_BYTES
    record = json.loads(line)
    kept = [name for name in record if name.startswith("field")]
    assert kept and record["dropped_fields"] == 2000 - len(kept)
    assert verify_log(log_path, PUB).ok


def test_records_without_a_file_are_bounded_too(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="airlock.audit"):
        AuditLog(None).record("authorization", resource="x" * 100_000)
    [message] = [r.getMessage() for r in caplog.records]
    assert len(message) < MAX_RECORD_BYTES and "more characters]" in message


# --- group commit: records submitted by decisions about to take effect --------------------------


class GatedFsync:
    """os.fsync that records what the file held when it ran, and can be held at its next call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, log_path: Path) -> None:
        self.real, self.path = os.fsync, str(log_path)
        self.synced: list[int] = []  # the log's size at each of its fsyncs
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == self.path:
            self.entered.set()
            self.release.wait(10)
            self.synced.append(os.fstat(fd).st_size)
        self.real(fd)


async def test_submitted_records_that_arrive_together_share_one_write_and_one_fsync(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync="always", sign_every_seconds=0), signing_key=KEY)
    fsync = GatedFsync(monkeypatch, log_path)
    fsync.release.clear()  # the first group's fsync takes its time: the next ones pile up meanwhile
    first = log.submit("authorization", decision="allow", subject="first")
    assert first is not None
    await asyncio.to_thread(fsync.entered.wait, 10)
    later = [log.submit("authorization", decision="allow", subject=f"u{i}") for i in range(20)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in [first, *later] if isinstance(w, asyncio.Future))  # none synced yet
    writes: list[int] = []
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: (writes.append(len(bufs)), real_writev(fd, bufs))[1])
    fsync.release.set()
    await asyncio.gather(first, *[w for w in later if w is not None])
    size = log_path.stat().st_size
    assert writes == [20]  # the 20 that waited: one write
    assert len(fsync.synced) == 2 and fsync.synced[-1] == size  # and one fsync, covering all of them
    log.close()
    monkeypatch.undo()
    report = verify_log(log_path, PUB)
    assert report.ok and report.records == 21, report.problems
    subjects = [json.loads(line)["subject"] for line in lines(log_path)]
    assert subjects == ["first"] + [f"u{i}" for i in range(20)]  # in the order submitted


async def test_a_submitted_record_is_fsynced_before_its_caller_goes_on(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync="always", sign_every_seconds=0))
    fsync = GatedFsync(monkeypatch, log_path)
    for i in range(5):
        written = log.submit("authorization", decision="allow", subject=f"u{i}")
        assert written is not None
        await written
        end = log_path.stat().st_size
        assert fsync.synced and fsync.synced[-1] == end  # the fsync came after the record was written
    log.close()


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_without_fsync_always_a_submitted_record_is_written_at_once(
    log_path: Path, policy: str
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync=policy, sign_every_seconds=0))
    assert log.submit("authorization", decision="allow") is None  # nothing to await: it is written
    assert len(lines(log_path)) == 1
    log.close()


async def test_a_record_written_now_goes_after_those_submitted_before_it(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync="always", sign_every_seconds=0), signing_key=KEY)
    fsync = GatedFsync(monkeypatch, log_path)
    fsync.release.clear()
    first = log.submit("authorization", subject="a")
    await asyncio.to_thread(fsync.entered.wait, 10)
    second = log.submit("authorization", subject="b")  # waits for the next group
    fsync.release.set()
    await asyncio.to_thread(log.record, "lockout", subject="c")  # written with (after) b, at once
    assert first is not None and second is not None
    await asyncio.gather(first, second)
    log.close()
    assert [json.loads(line)["subject"] for line in lines(log_path)] == ["a", "b", "c"]
    assert verify_log(log_path, PUB).ok


async def test_a_caller_that_goes_away_while_it_waits_still_has_its_record_written(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync="always", sign_every_seconds=0))
    fsync = GatedFsync(monkeypatch, log_path)
    fsync.release.clear()
    written = log.submit("authorization", subject="gone")
    assert written is not None
    waiter = asyncio.ensure_future(written)
    await asyncio.to_thread(fsync.entered.wait, 10)
    waiter.cancel()
    fsync.release.set()
    log.close()
    assert [json.loads(line)["subject"] for line in lines(log_path)] == ["gone"]


async def test_a_failed_group_fails_every_caller_in_it_and_the_log_stays_closed(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(log_path, config=AuditConfig(fsync="always", sign_every_seconds=0), signing_key=KEY)
    fsync = GatedFsync(monkeypatch, log_path)
    fsync.release.clear()
    first = log.submit("authorization", subject="ok")
    await asyncio.to_thread(fsync.entered.wait, 10)
    group = [log.submit("authorization", subject=f"u{i}") for i in range(3)]
    real_writev = os.writev

    def full(fd: int, buffers: list[bytes]) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(log_path):
            raise OSError(28, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", full)
    fsync.release.set()
    assert first is not None
    await first
    results = await asyncio.gather(*[w for w in group if w is not None], return_exceptions=True)
    assert all(isinstance(r, UnavailableError) and r.reason == "AUDIT_UNAVAILABLE" for r in results)
    with pytest.raises(UnavailableError):
        log.submit("authorization", subject="later")  # closed until an operator restarts it
    assert "No space left on device" in caplog.text
    log.close()
    assert [json.loads(line)["subject"] for line in lines(log_path)] == ["ok"]
