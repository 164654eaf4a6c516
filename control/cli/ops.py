"""Operator commands of `airlock`: audit verification, signed bundles and the health probe.

airlock audit verify [--dir DIR | --file LOG] [--key PUB] [--require-signed] [--expect-head HEAD]
                     [--archive [s3://BUCKET/PREFIX]]       check chains, signatures (and the archive's heads)
airlock audit head [--file LOG] [--key PUB]                 the last signed head, as JSON
airlock bundle keygen --out KEY                             a new Ed25519 signing key (+ KEY.pub)
airlock bundle create DIR [--name N]                        write DIR/airlock-bundle.json
airlock bundle sign DIR [--key KEY]                         write DIR/airlock-bundle.sig
airlock bundle verify DIR [--trusted-keys FILE]             signature, digests, no extra files
airlock health [--address HOST:PORT] [--ca FILE] [--service S --token T]   exit 0 when SERVING
                                                            (default: the running stack's gateway)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airlock.connection import Connection
from control.audit_verify import (
    ArchivedHead,
    Head,
    head_document,
    load_head,
    load_public_keys,
    logs_in,
    verify_log,
)
from control.cli.output import err as _err
from control.cli.output import working
from control.pki import ensure_dev_pki, existing_dev_pki
from control.runfile import find_running
from gateway import config as config_mod
from serving.bundle import (
    BundleError,
    create_manifest,
    key_id,
    load_private_key,
    load_trusted_keys,
    sign_bundle,
    verify_bundle,
)

__all__ = [
    "cmd_audit_head",
    "cmd_audit_verify",
    "cmd_bundle_create",
    "cmd_bundle_keygen",
    "cmd_bundle_sign",
    "cmd_bundle_verify",
    "cmd_health",
]


def _config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, state_dir=args.state_dir)


# A running gateway signs its head within about twice `audit.sign_every_seconds` (the signing
# thread looks that often at most); records older than that plus this, and unsigned, fail verify.
UNSIGNED_SLACK_SECONDS = 60.0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    cfg = _config(args)
    key_path = args.key or ensure_dev_pki(cfg.state_dir).audit_pub
    try:
        keys = load_public_keys(key_path)
    except (OSError, ValueError) as exc:
        _err(f"audit verify: public key {key_path}: {exc}")
        return 2
    head: Head | None = None
    if args.expect_head is not None:
        try:
            head = load_head(args.expect_head)
        except (OSError, ValueError) as exc:
            _err(f"audit verify: --expect-head: {exc}")
            return 2
    logs = [args.file] if args.file else logs_in(args.dir or cfg.audit_path.parent)
    archive = getattr(args, "archive", None)
    if not logs:
        _err(f"audit verify: no audit log (*.jsonl) in {args.dir or cfg.audit_path.parent}")
        return 2
    every = cfg.audit.sign_every_seconds
    grace = 2 * every + UNSIGNED_SLACK_SECONDS if every > 0 else None
    failed = 0
    if head is not None and head.log not in {log.name for log in logs}:
        print(f"FAIL the expected head is of log {head.log}, which is not among the logs verified")
        failed += 1
    for log in logs:
        expected = head if head is not None and head.log == log.name else None
        archived: list[ArchivedHead] = []
        if archive is not None:
            from control.cli.storage import archive_heads_for
            from serving.s3 import StorageError

            try:
                archived, strays = archive_heads_for(cfg, archive, log)
            except StorageError as exc:
                print(f"FAIL {log}: the archive can't be read: {exc} [{exc.reason}]")
                failed += 1
                continue
            for stray in strays:
                print(f"WARN {stray}: in the archive's heads, and not a head")
        report = verify_log(log, keys, require_signed=args.require_signed, unsigned_grace=grace,
                            expect_head=expected, archived=archived)  # fmt: skip
        for problem in report.problems:
            print(f"FAIL {problem}")
        verdict = "OK" if report.ok else "FAILED"
        tail = f", {report.unsigned_tail} record(s) after the last signature" if report.unsigned_tail else ""
        if archive is not None:
            tail += f", {report.archived_heads} archived head(s) checked"
        print(
            f"{verdict} {log}: {report.records} record(s) in {report.files} file(s), "
            f"{report.signatures} signature(s) by key(s) {', '.join(sorted(keys))}, last signed seq "
            f"{report.last_signed_seq}{tail}"
        )
        failed += not report.ok
    return 1 if failed else 0


def cmd_audit_head(args: argparse.Namespace) -> int:
    """Print the last signed head of a log that verifies: a small JSON document to keep off the
    host and hand back to `audit verify --expect-head` (or to an archive) later."""
    cfg = _config(args)
    key_path = args.key or ensure_dev_pki(cfg.state_dir).audit_pub
    try:
        keys = load_public_keys(key_path)
    except (OSError, ValueError) as exc:
        _err(f"audit head: public key {key_path}: {exc}")
        return 2
    log = args.file or cfg.audit_path
    if not log.exists():
        _err(f"audit head: no audit log {log}")
        return 2
    report = verify_log(log, keys)
    for problem in report.problems:
        _err(f"audit head: FAIL {problem}")
    document = head_document(report)
    if not report.ok or document is None:
        _err(f"audit head: {log} does not verify; no head exported")
        return 1
    print(json.dumps(document, sort_keys=True))
    return 0


def cmd_bundle_keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists():
        _err(f"bundle keygen: {out} exists; refusing to overwrite a key")
        return 2
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "xb", opener=lambda p, f: os.open(p, f, 0o600)) as fh:
        fh.write(pem)
    public = out.with_name(out.name + ".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    print(f"private key: {out} (mode 0600; keep it off the cluster)")
    print(f"public key:  {public} (append it to the trusted-keys file), key id {key_id(key.public_key())}")
    return 0


def cmd_bundle_create(args: argparse.Namespace) -> int:
    try:
        with working(f"hashing {_size_of(args.dir)} in {args.dir}"):
            path = create_manifest(args.dir, name=args.name)
    except BundleError as exc:
        _err(f"bundle create: {exc}")
        return 1
    print(f"manifest: {path}")
    return 0


def cmd_bundle_sign(args: argparse.Namespace) -> int:
    key_path = args.key or ensure_dev_pki(_config(args).state_dir).bundle_key
    try:
        path = sign_bundle(args.dir, load_private_key(key_path))
    except (BundleError, OSError, ValueError) as exc:
        _err(f"bundle sign: {exc}")
        return 1
    print(f"signature: {path}")
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    cfg = _config(args)
    trusted = args.trusted_keys or cfg.bundles.trusted_keys or ensure_dev_pki(cfg.state_dir).bundle_trusted
    if str(args.dir).startswith("s3://"):
        from control.cli.storage import verify_remote_bundle

        return verify_remote_bundle(args, cfg, trusted)
    args.dir = Path(args.dir)
    try:
        with working(f"verifying {_size_of(args.dir)} in {args.dir}"):
            verified = verify_bundle(args.dir, load_trusted_keys(trusted))
    except BundleError as exc:
        print(f"FAIL {exc} [{exc.reason}]")
        return 1
    print(f"OK {args.dir}: bundle {verified.name!r}, {verified.files} file(s), key {verified.key_id}")
    return 0


def _size_of(directory: Path) -> str:
    """How much a bundle step reads: its files and bytes, for the progress line."""
    try:
        files = [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()]
        total = float(sum(p.stat().st_size for p in files))
    except OSError:
        return "files"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if total < 1024 or unit == "TiB":
            break
        total /= 1024
    return f"{len(files)} file(s), {total:.1f} {unit}"


def cmd_health(args: argparse.Namespace) -> int:
    """A grpc_health_probe in Python: TLS to the gateway, `Check` for the whole server. Without
    --address it probes the stack running from the state directory (never a default address)."""
    cfg = _config(args)
    running = None if args.address else find_running(cfg.state_dir)
    address = args.address or (running.address if running else "")
    if args.ca is not None:
        ca = args.ca
    elif running is not None and running.info.get("ca"):
        ca = Path(running.info["ca"])
    else:
        pki = existing_dev_pki(cfg.state_dir)
        if pki is None:
            _err(f"health: no development PKI in {cfg.state_dir / 'pki'}: pass --ca, the gateway's CA")
            return 2
        ca = pki.ca_cert
    pair = (args.key.read_bytes(), args.cert.read_bytes()) if args.cert and args.key else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), *pair)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    with grpc.secure_channel(_local(address), credentials, options) as channel:
        try:
            metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            explained = Connection(address, str(ca), args.cert is not None).explain(exc.details() or "")
            if explained is not None:
                _err(f"health: {explained.reason}: {explained.message}")
            else:
                _err(f"health: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _local(address: str) -> str:
    """A wildcard listen address, probed from inside the same host or container, is loopback."""
    host, _, port = address.rpartition(":")
    return {"0.0.0.0": f"127.0.0.1:{port}", "[::]": f"[::1]:{port}"}.get(host, address)
