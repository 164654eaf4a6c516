"""The audit archive against a real Object Lock bucket (the session's local Ceph RGW): every signed
head and each closed segment lands there under COMPLIANCE retention, a delete or a shorter retention
is refused by the store, sealed segments open only with their key and name, and an outage of the
store blocks no record, shows in health and metrics, and loses no segment once it is back."""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import CollectorRegistry

from gateway.archive import ArchiveLayout, Archiver, open_sealed
from gateway.audit import AuditLog, segments
from gateway.config import AuditArchiveConfig, AuditConfig
from serving.s3 import ObjectStore, S3Settings, StorageError
from tests.ceph import CephCluster, S3Site

KEY = ed25519.Ed25519PrivateKey.generate()
# Small segments and frequent signatures, so a few dozen records rotate and sign several times.
AUDIT = AuditConfig(rotate_bytes=2048, sign_every_records=5, sign_every_seconds=0, fsync="never")


def settings(site: S3Site) -> S3Settings:
    return S3Settings(site.endpoint, credentials_file=site.credentials_file, timeout_seconds=3.0)


@pytest.fixture
def store(s3_site: S3Site) -> ObjectStore:
    return ObjectStore(settings(s3_site))


def archive_config(**changes: object) -> AuditArchiveConfig:
    url = f"s3://audit-{secrets.token_hex(4)}/{{host}}/gw"
    return AuditArchiveConfig(url=url, retention_days=1, poll_seconds=0.2, max_backlog_segments=1,
                              **changes)  # type: ignore[arg-type]  # fmt: skip


def write(log: AuditLog, count: int) -> None:
    for i in range(count):
        log.record("authorization", decision="allow", subject=f"acme/u{i}", tenant="acme", pad="x" * 100)


def archived(store: ObjectStore, archiver: Archiver) -> dict[str, str]:
    """Archived object key -> version id, for this log."""
    prefix = archiver.layout.url.key(f"{archiver.layout.log}/")
    return dict(store.versions(archiver.layout.url.bucket, prefix))


def sidecar_heads(path: Path) -> set[tuple[int, str]]:
    entries = [json.loads(line) for line in path.with_name(f"{path.name}.sig").read_bytes().splitlines()]
    return {(int(e["seq"]), str(e["hash"])) for e in entries}


def segment_key(layout: ArchiveLayout, segment: Path, *, sealed: bool = False) -> str:
    number = int(segment.name.rsplit(".", 1)[1])
    return layout.segment_key(number, hashlib.sha256(segment.read_bytes()).hexdigest(), sealed)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_segments_and_heads_land_under_compliance_retention_and_delete_is_refused(
    tmp_path: Path, s3_site: S3Site, store: ObjectStore
) -> None:
    path = tmp_path / "gateway.jsonl"
    log = AuditLog(path, config=AUDIT, signing_key=KEY)
    archiver = Archiver(path, archive_config(), settings(s3_site), registry=CollectorRegistry())
    write(log, 60)
    log.close()
    assert archiver.run_once()  # everything acknowledged
    objects = archived(store, archiver)
    closed = [p for p in segments(path) if p != path]
    assert len(closed) >= 3
    bucket, layout = archiver.layout.url.bucket, archiver.layout
    for segment in closed:
        key = segment_key(layout, segment)
        assert store.get(bucket, key) == segment.read_bytes()
    heads = {layout.head_key(seq, head) for seq, head in sidecar_heads(path)}
    assert heads <= set(objects) and len(heads) >= 12
    # WORM: the store itself refuses to delete a version or to shorten its retention.
    for key in (sorted(heads)[0], segment_key(layout, closed[0])):
        version = objects[key]
        mode, until = store.retention(bucket, key, version) or ("", None)
        assert mode == "COMPLIANCE" and until is not None
        with pytest.raises(StorageError) as caught:
            store.delete(bucket, key, version)
        assert caught.value.reason == "STORAGE_DENIED"
        with pytest.raises(Exception, match="AccessDenied"):
            store._client.put_object_retention(
                Bucket=bucket, Key=key, VersionId=version,
                Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until - datetime.timedelta(hours=1)},
            )  # fmt: skip
        store.delete(bucket, key)  # a delete marker only: the locked version is still there
        assert store.get(bucket, key, version)
    assert not archiver.backlog()[0] and archiver.backlog()[1] == 0


def test_sealed_segments_open_only_with_their_key_and_name(
    tmp_path: Path, s3_site: S3Site, store: ObjectStore
) -> None:
    key_file = tmp_path / "archive.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)
    path = tmp_path / "gateway.jsonl"
    log = AuditLog(path, config=AUDIT, signing_key=KEY)
    archiver = Archiver(
        path, archive_config(seal_key=key_file), settings(s3_site), registry=CollectorRegistry()
    )
    write(log, 30)
    log.close()
    assert archiver.run_once()
    segment = path.with_name(f"{path.name}.1")
    name = segment_key(archiver.layout, segment, sealed=True)
    blob = store.get(archiver.layout.url.bucket, name)
    assert b"acme/u" not in blob
    assert open_sealed(key_file.read_bytes(), name, blob) == segment.read_bytes()
    with pytest.raises(InvalidTag):  # moved to another name: authentication fails
        open_sealed(key_file.read_bytes(), name.replace("00000001-", "00000002-"), blob)


def test_an_outage_of_the_store_blocks_nothing_shows_and_loses_no_segment(
    tmp_path: Path, s3_site: S3Site, store: ObjectStore, ceph: CephCluster
) -> None:
    path = tmp_path / "gateway.jsonl"
    log = AuditLog(path, config=AUDIT, signing_key=KEY)
    registry = CollectorRegistry()
    health: list[bool] = []
    archiver = Archiver(path, archive_config(), settings(s3_site), registry=registry, on_health=health.append)
    log.on_change = archiver.wake
    archiver.start()
    try:
        write(log, 20)
        wait_for(lambda: archiver.healthy is True and archiver.backlog() == ([], 0), "the first segments")
        ceph.stop_rgw()
        try:
            write(log, 80)  # records, signatures and rotations go on while the store is away
            wait_for(lambda: archiver.healthy is False, "health to say the archive is behind")
            sample = registry.get_sample_value
            wait_for(lambda: (sample("airlock_audit_archive_backlog_segments", {"log": path.name}) or 0) > 1,
                     "the backlog in metrics")  # fmt: skip
            assert sample("airlock_audit_archive_healthy", {"log": path.name}) == 0
            assert (sample("airlock_audit_archive_errors_total", {"log": path.name}) or 0) >= 1
        finally:
            ceph.start_rgw()
        write(log, 5)
        wait_for(
            lambda: archiver.backlog() == ([], 0) and archiver.healthy is True, "the archive to catch up"
        )
    finally:
        log.close()
        archiver.close()
    objects = archived(store, archiver)
    closed = [p for p in segments(path) if p != path]
    for segment in closed:
        assert segment_key(archiver.layout, segment) in objects
    heads = {archiver.layout.head_key(seq, head) for seq, head in sidecar_heads(path)}
    assert heads <= set(objects), "every signed head, the closing one included"
    assert health[0] is True and False in health and health[-1] is True


def test_a_segment_that_reuses_an_archived_name_is_archived_too(
    tmp_path: Path, s3_site: S3Site, store: ObjectStore
) -> None:
    path = tmp_path / "gateway.jsonl"
    archiver = Archiver(path, archive_config(), settings(s3_site), registry=CollectorRegistry())
    log = AuditLog(path, config=AUDIT, signing_key=KEY)
    write(log, 20)
    assert archiver.run_once()
    first = segment_key(archiver.layout, path.with_name(f"{path.name}.1"))
    for old in [p for p in segments(path) if p != path]:  # an operator prunes the local copies
        old.unlink()
    write(log, 20)  # rotation numbers start over at .1
    log.close()
    assert archiver.backlog()[0], "the new .1 is not the archived .1"
    assert archiver.run_once()
    objects = archived(store, archiver)
    assert first in objects and segment_key(archiver.layout, path.with_name(f"{path.name}.1")) in objects


def test_a_bucket_without_object_lock_is_refused(tmp_path: Path, s3_site: S3Site, store: ObjectStore) -> None:
    config = archive_config()
    layout = ArchiveLayout.of(config.url, "gateway.jsonl")
    store.ensure_bucket(layout.url.bucket)  # made without Object Lock beforehand
    archiver = Archiver(tmp_path / "gateway.jsonl", config, settings(s3_site), registry=CollectorRegistry())
    with pytest.raises(StorageError) as caught:
        archiver.run_once()
    assert caught.value.reason == "STORAGE_DENIED" and "Object Lock" in str(caught.value)
