"""Operator commands that talk to the object store ([s3] in the configuration, docs/storage.md).

airlock bundle push DIR s3://BUCKET/PREFIX [--trusted-keys F]   verify, then upload (signature last)
airlock bundle pull s3://BUCKET/PREFIX DIR [--trusted-keys F]   stream, verify, keep as a folder
airlock bundle verify s3://BUCKET/PREFIX                        stream and verify, keep nothing
airlock audit verify --archive [s3://BUCKET/PREFIX]             the local trail against its WORM copy
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from control.audit_verify import ArchivedHead, archived_heads
from control.cli.output import err as _err
from control.pki import ensure_dev_pki
from gateway import config as config_mod
from gateway.archive import ArchiveLayout
from serving.bundle import BundleError, load_trusted_keys
from serving.remote_bundle import pull, push
from serving.s3 import ObjectStore, S3Url, StorageError

__all__ = ["archive_heads_for", "cmd_bundle_pull", "cmd_bundle_push", "verify_remote_bundle"]


def _store(cfg: config_mod.Config) -> ObjectStore:
    if cfg.s3 is None:
        raise StorageError(f"{cfg.source}: no [s3] table: the object store is not configured",
                           reason="STORAGE_URL_INVALID")  # fmt: skip
    return ObjectStore(cfg.s3)


def _trusted(args: argparse.Namespace, cfg: config_mod.Config) -> Path:
    given: Path | None = args.trusted_keys
    return given or cfg.bundles.trusted_keys or ensure_dev_pki(cfg.state_dir).bundle_trusted


def cmd_bundle_push(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    try:
        url = S3Url.parse(args.url)
        files = push(_store(cfg), args.dir, url, load_trusted_keys(_trusted(args, cfg)))
    except (BundleError, StorageError) as exc:
        _err(f"bundle push: {exc} [{exc.reason}]")
        return 1
    print(f"OK pushed {args.dir} to {url}: {files} file(s), signature last")
    return 0


def cmd_bundle_pull(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, state_dir=args.state_dir)
    target: Path = args.dir.absolute()
    try:
        url = S3Url.parse(args.url)
        pulled = pull(_store(cfg), url, target, load_trusted_keys(_trusted(args, cfg)))
    except (BundleError, StorageError) as exc:
        print(f"FAIL {exc} [{exc.reason}]")
        return 1
    how = "already there, verified" if pulled.cached else "streamed and verified"
    rate = pulled.bytes / pulled.seconds / 1e6 if pulled.seconds > 0 else 0.0
    print(f"OK {url} -> {target}: bundle {pulled.name!r}, {pulled.files} file(s), {pulled.bytes} bytes "
          f"{how} in {pulled.seconds:.1f} s ({rate:.0f} MB/s), key {pulled.key_id}")  # fmt: skip
    return 0


def verify_remote_bundle(args: argparse.Namespace, cfg: config_mod.Config, trusted: Path) -> int:
    """`bundle verify s3://…`: every byte streamed and checked, nothing kept."""
    with tempfile.TemporaryDirectory(prefix="airlock-verify-") as tmp:
        try:
            url = S3Url.parse(args.dir)
            pulled = pull(_store(cfg), url, Path(tmp) / "bundle", load_trusted_keys(trusted), reuse=False)
        except (BundleError, StorageError) as exc:
            print(f"FAIL {exc} [{exc.reason}]")
            return 1
    print(f"OK {url}: bundle {pulled.name!r}, {pulled.files} file(s), key {pulled.key_id}")
    return 0


def archive_heads_for(cfg: config_mod.Config, given: str, log: Path) -> tuple[list[ArchivedHead], list[str]]:
    """Every head archived for `log` under `given` (or audit.archive.url), and stray objects."""
    url = given or cfg.audit.archive.url
    if not url:
        raise StorageError("audit verify --archive: no URL given and audit.archive.url is not set",
                           reason="STORAGE_URL_INVALID")  # fmt: skip
    layout = ArchiveLayout.of(url, log.name)
    store = _store(cfg)
    listing = store.versions(layout.url.bucket, layout.heads_prefix)
    bucket = layout.url.bucket

    def fetch(key: str, version: str) -> bytes:
        return store.get(bucket, key, version)

    return archived_heads(listing, f"s3://{bucket}", fetch)
