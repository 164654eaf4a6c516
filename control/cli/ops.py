"""Operator commands of `airlock`: audit verification, signed bundles and the health probe.

airlock audit verify [--dir DIR | --file LOG] [--key PUB] [--require-signed] [--expect-head HEAD]
                                                            check chains and signatures
airlock audit head [--file LOG] [--key PUB]                 the last signed head, as JSON
airlock bundle keygen --out KEY                             a new Ed25519 signing key (+ KEY.pub)
airlock bundle create DIR [--name N]                        write DIR/airlock-bundle.json
airlock bundle sign DIR [--key KEY]                         write DIR/airlock-bundle.sig
airlock bundle verify DIR [--trusted-keys FILE]             signature, digests, no extra files
airlock health [--address HOST:PORT] [--ca FILE] [--service S --token T]   exit 0 when SERVING
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.audit_verify import Head, head_document, load_head, load_public_keys, logs_in, verify_log
from control.pki import ensure_dev_pki
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

__all__ = ["add_ops_commands"]


def _err(message: str) -> None:
    print(f"airlock: {message}", file=sys.stderr, flush=True)


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
        report = verify_log(log, keys, require_signed=args.require_signed, unsigned_grace=grace,
                            expect_head=expected)  # fmt: skip
        for problem in report.problems:
            print(f"FAIL {problem}")
        verdict = "OK" if report.ok else "FAILED"
        tail = f", {report.unsigned_tail} record(s) after the last signature" if report.unsigned_tail else ""
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
    try:
        verified = verify_bundle(args.dir, load_trusted_keys(trusted))
    except BundleError as exc:
        print(f"FAIL {exc} [{exc.reason}]")
        return 1
    print(f"OK {args.dir}: bundle {verified.name!r}, {verified.files} file(s), key {verified.key_id}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """A grpc_health_probe in Python: TLS to the gateway, `Check` for the whole server."""
    cfg = _config(args)
    ca = args.ca or ensure_dev_pki(cfg.state_dir).ca_cert
    pair = (args.key.read_bytes(), args.cert.read_bytes()) if args.cert and args.key else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), *pair)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    with grpc.secure_channel(_local(args.address or cfg.gateway.listen), credentials, options) as channel:
        try:
            metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            _err(f"health: {exc.code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _local(address: str) -> str:
    """A wildcard listen address, probed from inside the same host or container, is loopback."""
    host, _, port = address.rpartition(":")
    return {"0.0.0.0": f"127.0.0.1:{port}", "[::]": f"[::1]:{port}"}.get(host, address)


def add_ops_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    audit = sub.add_parser("audit", help="verify the tamper-evident audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", parents=[common], help="check hash chains and signatures")
    where = verify.add_mutually_exclusive_group()
    where.add_argument("--dir", type=Path, help="verify every log in DIR (default: the configured one's)")
    where.add_argument("--file", type=Path, help="verify one log (its rotated files come with it)")
    verify.add_argument(
        "--key", type=Path, help="PEM file of Ed25519 public keys, old ones too (default: the dev audit key)"
    )
    verify.add_argument(
        "--require-signed", action="store_true", help="fail when any record is covered by no signature"
    )
    verify.add_argument(
        "--expect-head", type=Path, metavar="HEAD", help="fail unless the log still holds this head "
        "(a file written by `airlock audit head`)",
    )  # fmt: skip
    verify.set_defaults(func=cmd_audit_verify)
    head = asub.add_parser("head", parents=[common], help="print the last signed chain head (JSON)")
    head.add_argument("--file", type=Path, help="the log (default: the configured one)")
    head.add_argument(
        "--key", type=Path, help="PEM file of Ed25519 public keys, old ones too (default: the dev audit key)"
    )
    head.set_defaults(func=cmd_audit_head)

    bundle = sub.add_parser("bundle", help="create, sign and verify signed model bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    keygen = bsub.add_parser("keygen", help="make an Ed25519 signing key and its public half")
    keygen.add_argument("--out", type=Path, required=True)
    keygen.set_defaults(func=cmd_bundle_keygen)
    create = bsub.add_parser("create", help="write the manifest of sha256 digests")
    create.add_argument("dir", type=Path)
    create.add_argument("--name", help="bundle name (default: the directory's)")
    create.set_defaults(func=cmd_bundle_create)
    sign = bsub.add_parser("sign", parents=[common], help="sign the manifest")
    sign.add_argument("dir", type=Path)
    sign.add_argument("--key", type=Path, help="Ed25519 private key (default: the dev bundle key)")
    sign.set_defaults(func=cmd_bundle_sign)
    check = bsub.add_parser("verify", parents=[common], help="check signature and every file")
    check.add_argument("dir", type=Path)
    check.add_argument("--trusted-keys", type=Path, help="PEM public keys (default: bundles.trusted_keys)")
    check.set_defaults(func=cmd_bundle_verify)

    health = sub.add_parser("health", parents=[common], help="gRPC health check of a gateway")
    health.add_argument("--address", help="HOST:PORT (default: gateway.listen)")
    health.add_argument("--ca", type=Path, help="CA certificate (default: the dev CA)")
    health.add_argument("--server-name", help="TLS name to expect when the address is not it")
    health.add_argument("--cert", type=Path, help="client certificate, for servers that require mTLS")
    health.add_argument("--key", type=Path, help="the client certificate's key")
    health.add_argument(
        "--service", default="",
        help="service name ('' = the whole server; tenant/NAME needs --token or --cert of that tenant)",
    )  # fmt: skip
    health.add_argument("--token", help="a bearer token, for a tenant's own status on the token port")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=cmd_health)
