"""S3-compatible object storage (Ceph RGW on site): the one place Airlock talks S3.

The worker streams signed model bundles from it (serving/remote_bundle.py), the gateway and the
supervisor archive their audit trail to a bucket with Object Lock (gateway/archive.py), and the
CLI pushes, pulls and verifies. The client library is boto3 (botocore), imported when a store is
first opened: it is the most used and best kept S3 client, it speaks Object Lock and versions,
and on the local RGW its ranged GETs were as fast as minio's and faster than obstore's
(docs/storage.md has the comparison). Its exceptions are translated here into `StorageError`.

Credentials are never in the configuration: a 0600 file (`access_key_id = …`,
`secret_access_key = …`) or the environment variables `S3Settings` names.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.settings import S3Settings

__all__ = ["ObjectStore", "S3Settings", "S3Url", "StorageError", "load_credentials"]

# A bucket name as S3 allows it; a prefix of printable characters without `..` segments.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StorageError(Exception):
    """The object store refused or could not be reached; `reason` says which, never a secret.

    STORAGE_URL_INVALID  not s3://BUCKET[/PREFIX]
    STORAGE_CREDENTIALS  no usable credentials (file unreadable or too open, variables unset)
    STORAGE_NOT_FOUND    no such bucket or object
    STORAGE_DENIED       the store refused (AccessDenied: a locked object, a missing permission)
    STORAGE_UNAVAILABLE  the store can't be reached or failed (retry later)
    """

    def __init__(self, message: str, *, reason: str, key: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.key = reason, key


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # no leading or trailing "/"; "" for the bucket's root

    @classmethod
    def parse(cls, text: str) -> S3Url:
        if not text.startswith("s3://"):
            raise StorageError(f"{text!r} is not an s3://BUCKET/PREFIX URL", reason="STORAGE_URL_INVALID")
        bucket, _, prefix = text[5:].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket):
            raise StorageError(f"{text!r}: {bucket!r} is not a bucket name", reason="STORAGE_URL_INVALID")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise StorageError(
                f"{text!r}: the prefix has an empty, . or .. segment", reason="STORAGE_URL_INVALID"
            )
        if not prefix.isprintable() or len(prefix) > 512:
            raise StorageError(
                f"{text!r}: the prefix is not printable text of at most 512 characters",
                reason="STORAGE_URL_INVALID",
            )
        return cls(bucket, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def load_credentials(settings: S3Settings) -> tuple[str, str]:
    """(access key id, secret key) from the credentials file, or else from the environment."""
    if settings.credentials_file is not None:
        path = settings.credentials_file
        try:
            st = path.stat()
            if st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
                raise StorageError(
                    f"S3 credentials file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                    f"read it, or it is not a regular file; refusing (chmod 600 {path})",
                    reason="STORAGE_CREDENTIALS",
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise StorageError(f"S3 credentials file {path}: {why}", reason="STORAGE_CREDENTIALS") from None
        values: dict[str, str] = {}
        for line in text.splitlines():
            name, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                values[name.strip().lower()] = value.strip()
        access, secret = values.get("access_key_id", ""), values.get("secret_access_key", "")
        if not access or not secret:
            raise StorageError(
                f"S3 credentials file {path}: needs access_key_id = … and secret_access_key = …",
                reason="STORAGE_CREDENTIALS",
            )
        return access, secret
    access = os.environ.get(settings.access_key_env, "")
    secret = os.environ.get(settings.secret_key_env, "")
    if not access or not secret:
        raise StorageError(
            f"S3 credentials: set s3.credentials_file, or the environment variables "
            f"{settings.access_key_env} and {settings.secret_key_env}",
            reason="STORAGE_CREDENTIALS",
        )
    return access, secret


class ObjectStore:
    """One S3 endpoint: thread-safe (botocore clients are), with a connection pool as wide as the
    parallel ranged GETs it serves."""

    def __init__(self, settings: S3Settings) -> None:
        import boto3
        import botocore.config

        access, secret = load_credentials(settings)
        self.settings = settings
        config = botocore.config.Config(
            max_pool_connections=max(10, settings.parallel * 2),
            connect_timeout=settings.timeout_seconds,
            read_timeout=settings.timeout_seconds,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},  # RGW without wildcard DNS
            # We verify every byte with our own sha256; RGW of older releases rejects the newer
            # default checksum headers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        verify: str | bool = str(settings.ca_file) if settings.ca_file is not None else True
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint.rstrip("/"),
            region_name=settings.region,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            config=config,
            verify=verify,
        )
        self._lock = threading.Lock()

    # --- reading ----------------------------------------------------------------------------------

    def get(self, bucket: str, key: str, version_id: str | None = None) -> bytes:
        extra = {"VersionId": version_id} if version_id else {}
        reply = self._call(
            "get", bucket, key, lambda: self._client.get_object(Bucket=bucket, Key=key, **extra)
        )
        return bytes(reply["Body"].read())

    def get_range(self, bucket: str, key: str, start: int, length: int) -> tuple[bytes, int]:
        """`length` bytes from `start` (fewer at the end), and the object's whole size."""
        rng = f"bytes={start}-{start + length - 1}"
        reply = self._call(
            "get", bucket, key, lambda: self._client.get_object(Bucket=bucket, Key=key, Range=rng)
        )
        total = str(reply.get("ContentRange", "")).rpartition("/")[2]
        data = bytes(reply["Body"].read())
        return data, int(total) if total.isdigit() else int(reply.get("ContentLength", len(data)))

    def size(self, bucket: str, key: str) -> int:
        reply = self._call("head", bucket, key, lambda: self._client.head_object(Bucket=bucket, Key=key))
        return int(reply["ContentLength"])

    def keys(self, bucket: str, prefix: str) -> list[str]:
        def listing() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        return list(self._call("list", bucket, prefix, listing))

    def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        """(key, version id) of every stored version under `prefix`, delete markers left out: a
        DELETE without a version only hides a locked object, and we look behind it."""

        def listing() -> list[tuple[str, str]]:
            pages = self._client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
            return [(v["Key"], v["VersionId"]) for page in pages for v in page.get("Versions", [])]

        return list(self._call("list", bucket, prefix, listing))

    # --- writing ----------------------------------------------------------------------------------

    def put(
        self, bucket: str, key: str, body: bytes, *, retain_until: datetime.datetime | None = None
    ) -> str:
        """Store `body`; with `retain_until`, under a COMPLIANCE retention no one can shorten or
        lift, root included, until then. Returns the version id ("" in an unversioned bucket)."""
        extra: dict[str, Any] = {}
        if retain_until is not None:
            extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": retain_until}
        reply = self._call(
            "put", bucket, key, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        )
        return str(reply.get("VersionId") or "")

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        """Upload a file, in parallel parts when it is large."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=self.settings.part_bytes,
            multipart_chunksize=self.settings.part_bytes,
            max_concurrency=self.settings.parallel,
        )
        self._call(
            "put", bucket, key, lambda: self._client.upload_file(str(path), bucket, key, Config=config)
        )

    def delete(self, bucket: str, key: str, version_id: str | None = None) -> None:
        extra = {"VersionId": version_id} if version_id else {}
        self._call("delete", bucket, key, lambda: self._client.delete_object(Bucket=bucket, Key=key, **extra))

    def ensure_bucket(self, bucket: str, *, object_lock: bool = False) -> None:
        """Create `bucket` unless it exists; with `object_lock`, refuse one that has no Object Lock
        (it can't be added to an existing bucket on every store, and WORM is the point)."""
        with self._lock:
            try:
                self._client.head_bucket(Bucket=bucket)
            except Exception as exc:
                if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise _translate(exc, "head", bucket, "") from None
                args: dict[str, Any] = {"ObjectLockEnabledForBucket": True} if object_lock else {}
                self._call("create", bucket, "", lambda: self._client.create_bucket(Bucket=bucket, **args))
            if object_lock and not self.object_lock_enabled(bucket):
                raise StorageError(
                    f"bucket {bucket} has no Object Lock: audit archives need a bucket created with it",
                    reason="STORAGE_DENIED",
                )

    def object_lock_enabled(self, bucket: str) -> bool:
        try:
            reply = self._client.get_object_lock_configuration(Bucket=bucket)
        except Exception as exc:
            if _code(exc) in ("ObjectLockConfigurationNotFoundError", "404", "NoSuchBucket"):
                return False
            raise _translate(exc, "lock", bucket, "") from None
        return bool(reply.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def retention(self, bucket: str, key: str, version_id: str) -> tuple[str, datetime.datetime] | None:
        try:
            reply = self._client.get_object_retention(Bucket=bucket, Key=key, VersionId=version_id)
        except Exception as exc:
            if _code(exc) in ("NoSuchObjectLockConfiguration", "ObjectLockConfigurationNotFoundError"):
                return None
            raise _translate(exc, "retention", bucket, key) from None
        r = reply["Retention"]
        return str(r["Mode"]), r["RetainUntilDate"]

    def _call(self, what: str, bucket: str, key: str, fn: Any) -> Any:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            raise _translate(exc, what, bucket, key) from None


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _translate(exc: Exception, what: str, bucket: str, key: str) -> StorageError:
    """botocore's exceptions as ours; the message names the object, never a credential."""
    code = _code(exc)
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound", "NoSuchVersion"):
        return StorageError(f"{what} {where}: not found", reason="STORAGE_NOT_FOUND", key=key)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
        return StorageError(
            f"{what} {where}: refused by the store ({code})", reason="STORAGE_DENIED", key=key
        )
    detail = code or type(exc).__name__
    return StorageError(
        f"{what} {where}: the store failed or can't be reached ({detail})",
        reason="STORAGE_UNAVAILABLE",
        key=key,
    )
