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

import concurrent.futures
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
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
    if target.exists() and not (target / MANIFEST).is_file():
        # Only a bundle is ever replaced: `airlock bundle pull s3://… ~` must not delete a home.
        raise BundleError(
            f"{target} exists and is not a bundle; refusing to replace it", reason="BUNDLE_UNSIGNED"
        )
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers of one model start together; one downloads
        for stale in target.parent.glob(f".{target.name}.partial-*"):
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            total = _download(store, url, verified.files, tmp, progress)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            (tmp / SIGNATURE).write_bytes(signature)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
                os.rmdir(old)
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


class _Lane:
    """One file's hash, fed its parts in order whichever thread fetched them: the thread that
    brings the next part hashes it and any later ones already waiting, while a thread whose part
    is early just leaves it and goes back to fetching. hashlib drops the GIL, so the files of a
    bundle hash in parallel, each in order, while other parts are in flight."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.size = int(entry["size"])
        self.hasher = hashlib.sha256()
        self.next = 0
        self.pending: dict[int, bytes] = {}
        self._mutex = threading.Lock()  # guards `pending` and `next`
        self._hashing = threading.Lock()  # held by the one thread hashing this file

    def offer(self, offset: int, data: bytes, consumed: Callable[[], None]) -> bool:
        """True for the one call after which the whole file is hashed."""
        with self._mutex:
            self.pending[offset] = data
        finished = False
        while self._hashing.acquire(blocking=False):
            try:
                while True:
                    with self._mutex:
                        chunk = self.pending.pop(self.next, None)
                    if chunk is None:
                        break
                    self.hasher.update(chunk)
                    with self._mutex:
                        self.next += len(chunk)
                        finished = finished or self.next == self.size
                    consumed()
                    if not chunk:  # an empty file: its one part is all there is
                        break
            finally:
                self._hashing.release()
            with self._mutex:  # a part that arrived while we were letting go is ours to hash
                if self.next not in self.pending or finished:
                    break
        return finished


def _download(
    store: ObjectStore,
    url: S3Url,
    files: dict[str, dict[str, Any]],
    into: Path,
    progress: Callable[[int], None],
) -> int:
    """Every listed file into `into`, verified. `parallel` threads fetch parts in order and write
    each where it belongs; each file is hashed in order as its parts arrive (`_Lane`). At most
    `parallel` + 2 parts are fetched and not yet hashed, so memory stays bounded whatever the
    bundle's size; the first failure stops the rest and is raised, naming its file."""
    part, parallel = store.settings.part_bytes, store.settings.parallel
    fds: dict[str, int] = {}
    lanes: dict[str, _Lane] = {}
    plan: list[tuple[str, int, int]] = []  # (file, offset, length), in order
    for rel, entry in sorted(files.items()):
        path = into / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fds[rel] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        lanes[rel] = _Lane(entry)
        size = int(entry["size"])
        if size == 0:
            plan.append((rel, 0, 0))
        plan += [(rel, offset, min(part, size - offset)) for offset in range(0, size, part)]
    slots = threading.Semaphore(parallel + 2)
    failed = threading.Event()

    def fetch(rel: str, offset: int, length: int) -> int:
        try:
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
            if total != lanes[rel].size or len(data) != length:
                raise BundleError(
                    f"{url}: {rel} differs from the signed manifest (size {total}, signed {lanes[rel].size})",
                    reason="BUNDLE_FILE_ALTERED",
                    file=rel,
                )
            os.pwrite(fds[rel], data, offset)
        except BaseException:
            failed.set()
            slots.release()
            raise
        if lanes[rel].offer(offset, data, slots.release):
            try:
                _check_digest(url, rel, lanes[rel].hasher.hexdigest(), files[rel])
            except BundleError:
                failed.set()
                raise
        progress(length)
        return length

    futures: list[concurrent.futures.Future[int]] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="bundle-get") as pool:
            try:
                for item in plan:
                    while not slots.acquire(timeout=0.5):
                        if failed.is_set():
                            break
                    if failed.is_set():
                        break
                    futures.append(pool.submit(fetch, *item))
            finally:
                if failed.is_set():
                    for future in futures:
                        future.cancel()
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        return sum(f.result() for f in futures)
    finally:
        for fd in fds.values():
            os.close(fd)


def _check_digest(url: S3Url, rel: str, digest: str, entry: dict[str, Any]) -> None:
    if digest != entry.get("sha256"):
        raise BundleError(
            f"{url}: {rel} differs from the signed manifest (sha256 mismatch)",
            reason="BUNDLE_FILE_ALTERED",
            file=rel,
        )
