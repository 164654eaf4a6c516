"""The worker's side of attestation: its ephemeral HPKE key, its measurements, its evidence, and the
tenant keys released to it.

At start the worker makes an HPKE key pair that lives only in this process and measures what it
runs: its code (airlock/ and worker/ sources), its configuration, and its model (the converted
model's manifest of sha256 digests). Evidence binds those to the verifier's nonce and the HPKE key,
signed with its tenant's worker attestation key (certificate from the attestation CA). On a GPU
in NVIDIA confidential-computing mode it adds the GPUs' own evidence, bound to the same nonce and
HPKE key (level `nvidia-cc`); otherwise the level is `software`.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

import airlock
import worker
from airlock.attestation import SUITES, HpkeKey, gpu_nonce, key_release_info, sign_statement
from airlock.errors import AttestationError
from airlock.v1 import inference_pb2 as pb
from airlock.v1 import worker_pb2

__all__ = ["WorkerAttestor", "measure_code"]

_log = logging.getLogger("airlock.worker.attestation")


def measure_code() -> str:
    """sha256 over the worker's own sources (path and digest of every .py file)."""
    digest = hashlib.sha256()
    for package in (airlock, worker):
        root = Path(str(package.__file__)).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _measure_json(value: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def nvidia_cc_evidence(nonce: bytes) -> str | None:
    """The GPUs' confidential-computing evidence for `nonce` (JSON, from NVIDIA's attestation SDK),
    or None where the SDK is absent or the GPU is not in CC mode. The verifier checks it itself."""
    try:
        from nv_attestation_sdk import attestation as nv  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        client = nv.Attestation()
        client.set_name("airlock-worker")
        client.set_nonce(nonce.hex())
        client.add_verifier(nv.Devices.GPU, nv.Environment.LOCAL, "", "")
        evidence = client.get_evidence()
        return json.dumps(evidence) if evidence else None
    except Exception as exc:  # no CC-capable GPU, CC off, driver mismatch: not this level
        _log.info("no NVIDIA confidential-computing evidence: %s", type(exc).__name__)
        return None


class WorkerAttestor:
    """Holds the worker's HPKE key and released tenant keys; produces evidence on demand."""

    def __init__(
        self,
        *,
        tenant: str,
        model: str,
        settings: Mapping[str, Any],
        model_manifest: bytes,
        attest_key: Path,
        attest_cert: Path,
        suite: str = SUITES[0],
        nvidia: bool = True,
        isolation: str = "dedicated",
        tenants: tuple[str, ...] = (),
    ) -> None:
        self.tenant = tenant
        # Said in every statement (and covered by the config measurement), so a verifier sees a
        # shared worker for what it is; `tenants` is everyone it serves.
        self.isolation = isolation
        self.tenants = tenants or (tenant,)
        self.model = model
        self.hpke = HpkeKey(suite)
        key = load_pem_private_key(attest_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the worker's attestation key must be an EC key")
        self._signing_key = key
        self._cert = attest_cert.read_bytes()
        self.measurements = {
            "code": measure_code(),
            "config": _measure_json(settings),
            "model": hashlib.sha256(model_manifest).hexdigest(),
        }
        self._nvidia = nvidia
        self.keys: dict[str, bytes] = {}
        self.active_key_id = ""
        self._nonces: collections.deque[bytes] = collections.deque(maxlen=64)  # evidence not yet answered

    def evidence(self, nonce: bytes) -> pb.Evidence:
        if not 16 <= len(nonce) <= 64:
            raise AttestationError("the nonce must be 16..64 bytes", reason="ATTESTATION_BAD_NONCE")
        gpu_evidence = nvidia_cc_evidence(gpu_nonce(nonce, self.hpke.worker_id)) if self._nvidia else None
        statement = {
            "version": 1,
            "level": "nvidia-cc" if gpu_evidence else "software",
            "tenant": self.tenant,
            "model": self.model,
            "isolation": self.isolation,
            "tenants": list(self.tenants),
            "measurements": self.measurements,
            "hpke_suite": self.hpke.suite,
            "hpke_public_key": base64.b64encode(self.hpke.public_bytes).decode(),
            "worker_id": self.hpke.worker_id,
            "nonce": base64.b64encode(nonce).decode(),
            "issued_at": time.time(),
        }
        evidence = sign_statement(statement, self._signing_key, self._cert)
        self._nonces.append(nonce)
        if gpu_evidence:
            evidence.nvidia_evidence = gpu_evidence
        return evidence

    def release(self, request: worker_pb2.KeyRelease) -> list[str]:
        """Accept the tenant's keys, sealed to this worker's HPKE key; replaces the previous set."""
        if request.tenant != self.tenant:
            raise AttestationError("keys for another tenant", reason="KEY_WRONG_TENANT")
        if request.worker_id != self.hpke.worker_id:
            raise AttestationError("keys sealed to another worker key", reason="KEY_WRONG_WORKER")
        if request.nonce not in self._nonces:  # each evidence is answered once: no replayed releases
            raise AttestationError("no evidence of this worker awaits that release", reason="KEY_REPLAYED")
        self._nonces.remove(request.nonce)
        info = key_release_info(self.tenant, self.hpke.worker_id, request.nonce)
        plain = self.hpke.open(request.sealed_keys, info)
        keys = worker_pb2.TenantKeys.FromString(plain)
        if keys.active_key_id not in keys.keys or any(len(k) != 32 for k in keys.keys.values()):
            raise AttestationError("released key set is malformed", reason="KEY_MALFORMED")
        self.keys = dict(keys.keys)
        self.active_key_id = keys.active_key_id
        return sorted(self.keys)

    def key(self, key_id: str) -> bytes:
        key = self.keys.get(key_id)
        if key is None:
            # The gateway re-attests and releases again on this reason (a restarted worker, a rotation).
            raise AttestationError("this worker holds no such tenant key", reason="KEYS_MISSING")
        return key
