"""Signed bundles in an object store: pushed by operators, streamed and verified by workers.

    s3://BUCKET/PREFIX/airlock-bundle.json, airlock-bundle.sig, and every file the manifest lists

`pull` checks the manifest's signature first (nothing in an unsigned manifest is worth reading),
then streams every listed file with parallel ranged GETs into a private temporary directory,
hashing each file in order while later parts are still arriving, and refuses the bundle, naming
the file, on a missing object, another size or another digest. Only a bundle whose every byte
verified is renamed into the cache, so an engine never sees an unverified byte. A cached copy is
used again only if the store still holds the same signed manifest and every cached file hashes to
it (`verify_bundle`, the same check as a local bundle). Objects in the prefix that the manifest does
not list are never downloaded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from serving.bundle import MANIFEST, SIGNATURE, BundleError, manifest_files, verify_bundle, verify_signature
from serving.s3 import ObjectStore, S3Url, StorageError

__all__ = ["Pulled", "pull", "push"]

_log = logging.getLogger("airlock.bundles")


@dataclass(frozen=True)
class Pulled:
    directory: Path
    name: str
    key_id: str
    files: int
    bytes: int
    seconds: float
    cached: bool  # True: the cached copy verified and was used


def push(
    store: ObjectStore,
    directory: Path,
    url: S3Url,
    trusted: dict[str, ed25519.Ed25519PublicKey] | None = None,
) -> int:
    """Upload a bundle directory (verified first when `trusted` is given); returns the file count.

    The signature goes first out and last in: while files are replaced, readers find no signature
    (or an old one that no longer matches) and refuse, never a mix that verifies."""
    if trusted is not None:
        verify_bundle(directory, trusted)
    for name in (MANIFEST, SIGNATURE):
        if not (directory / name).is_file():
            raise BundleError(
                f"{directory}: no {name}; create and sign the bundle first", reason="BUNDLE_UNSIGNED"
            )
    store.ensure_bucket(url.bucket)
    try:
        store.delete(url.bucket, url.key(SIGNATURE))
    except StorageError as exc:
        if exc.reason != "STORAGE_NOT_FOUND":
            raise
    _name, manifest = manifest_files((directory / MANIFEST).read_bytes(), where=str(directory))
    for rel in sorted(manifest):
        store.put_file(url.bucket, url.key(rel), directory / rel)
    store.put_file(url.bucket, url.key(MANIFEST), directory / MANIFEST)
    store.put_file(url.bucket, url.key(SIGNATURE), directory / SIGNATURE)
    return len(manifest)


def cache_dir_for(cache_root: Path, store: ObjectStore, url: S3Url) -> Path:
    """Where a bundle's verified copy is kept: one directory per (endpoint, bucket, prefix)."""
    digest = hashlib.sha256(f"{store.settings.endpoint}\0{url}".encode()).hexdigest()[:16]
    return cache_root / "s3" / f"{url.bucket}-{digest}"


def pull(
    store: ObjectStore,
    url: S3Url,
    target: Path,
    trusted: dict[str, ed25519.Ed25519PublicKey],
    *,
    reuse: bool = True,
    progress: Callable[[int], None] = lambda _n: None,
) -> Pulled:
    """Make `target` a verified copy of the bundle at `url` (see the module's docstring)."""
    t0 = time.monotonic()
    manifest_bytes = _get(store, url, MANIFEST)
    signature = _get(store, url, SIGNATURE)
    # The signature before anything else: an unsigned manifest's contents are not looked at.
    verified = _verify_manifest(url, manifest_bytes, signature, trusted)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers of one model start together; one downloads
        for stale in target.parent.glob(f".{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a download that was killed midway
        if reuse and _same(target, manifest_bytes, signature):
            try:
                checked = verify_bundle(target, trusted)
                total = sum(int(f["size"]) for f in verified.files.values())
                return Pulled(
                    target,
                    checked.name,
                    checked.key_id,
                    checked.files,
                    total,
                    time.monotonic() - t0,
                    cached=True,
                )
            except BundleError as exc:
                _log.warning("cached bundle copy rejected, downloading again: %s", exc)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            total = _download(store, url, verified.files, tmp, progress)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            (tmp / SIGNATURE).write_bytes(signature)
            if target.exists():
                old = target.with_name(f".{target.name}-old")
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Pulled(
        target,
        verified.name,
        verified.key_id,
        len(verified.files),
        total,
        time.monotonic() - t0,
        cached=False,
    )


@dataclass(frozen=True)
class _Manifest:
    name: str
    key_id: str
    files: dict[str, dict[str, Any]]


def _verify_manifest(
    url: S3Url, manifest: bytes, signature: bytes, trusted: dict[str, ed25519.Ed25519PublicKey]
) -> _Manifest:
    key_id = verify_signature(manifest, signature, trusted, where=str(url))
    name, files = manifest_files(manifest, where=str(url))
    return _Manifest(name or url.prefix.rsplit("/", 1)[-1] or url.bucket, key_id, files)


def _get(store: ObjectStore, url: S3Url, name: str) -> bytes:
    try:
        return store.get(url.bucket, url.key(name))
    except StorageError as exc:
        if exc.reason == "STORAGE_NOT_FOUND":
            raise BundleError(f"{url}: no {name}: the bundle is unsigned", reason="BUNDLE_UNSIGNED") from None
        raise


def _same(target: Path, manifest: bytes, signature: bytes) -> bool:
    try:
        return (target / MANIFEST).read_bytes() == manifest and (target / SIGNATURE).read_bytes() == signature
    except OSError:
        return False


def _download(
    store: ObjectStore,
    url: S3Url,
    files: dict[str, dict[str, Any]],
    into: Path,
    progress: Callable[[int], None],
) -> int:
    """Every listed file into `into`, verified. Parts are fetched `parallel` at a time and written
    where they belong by the fetching thread; this thread hashes them in order as they complete
    (hashlib drops the GIL on large buffers, so hashing overlaps the transfers), holding at most
    `parallel` + 2 parts in memory."""
    part, parallel = store.settings.part_bytes, store.settings.parallel
    fds: dict[str, int] = {}
    plan: list[tuple[str, int, int]] = []  # (file, offset, length), in order
    for rel, entry in sorted(files.items()):
        path = into / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fds[rel] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        size = int(entry["size"])
        if size == 0:
            plan.append((rel, 0, 0))
        plan += [(rel, offset, min(part, size - offset)) for offset in range(0, size, part)]

    def fetch(rel: str, offset: int, length: int) -> bytes:
        key = url.key(rel)
        try:
            if length == 0:
                total, data = store.size(url.bucket, key), b""
            else:
                data, total = store.get_range(url.bucket, key, offset, length)
        except StorageError as exc:
            if exc.reason == "STORAGE_NOT_FOUND":
                raise BundleError(
                    f"{url}: {rel} is missing", reason="BUNDLE_FILE_MISSING", file=rel
                ) from None
            raise
        if total != int(files[rel]["size"]) or len(data) != length:
            raise BundleError(
                f"{url}: {rel} differs from the signed manifest (size {total}, signed {files[rel]['size']})",
                reason="BUNDLE_FILE_ALTERED",
                file=rel,
            )
        os.pwrite(fds[rel], data, offset)
        return data

    hashers = {rel: hashlib.sha256() for rel in files}
    done_bytes: dict[str, int] = collections.Counter()
    total = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="bundle-get") as pool:
            queue: collections.deque[tuple[tuple[str, int, int], concurrent.futures.Future[bytes]]]
            queue = collections.deque()
            upcoming = iter(plan)
            try:
                for item in upcoming:
                    queue.append((item, pool.submit(fetch, *item)))
                    if len(queue) >= parallel + 2:
                        break
                while queue:
                    (rel, _offset, length), future = queue.popleft()
                    data = future.result()
                    hashers[rel].update(data)
                    done_bytes[rel] += length
                    total += length
                    progress(length)
                    if done_bytes[rel] == int(files[rel]["size"]):
                        _check_digest(url, rel, hashers[rel].hexdigest(), files[rel])
                    nxt = next(upcoming, None)
                    if nxt is not None:
                        queue.append((nxt, pool.submit(fetch, *nxt)))
            except BaseException:
                for _item, future in queue:
                    future.cancel()
                raise
    finally:
        for fd in fds.values():
            os.close(fd)
    return total


def _check_digest(url: S3Url, rel: str, digest: str, entry: dict[str, Any]) -> None:
    if digest != entry.get("sha256"):
        raise BundleError(
            f"{url}: {rel} differs from the signed manifest (sha256 mismatch)",
            reason="BUNDLE_FILE_ALTERED",
            file=rel,
        )
