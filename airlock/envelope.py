"""The sealed envelope: AES-256-GCM payloads whose authenticated header says what they are.

    key      = HKDF-SHA256(ikm=tenant or request key, salt=header.salt,
                           info="airlock/v1/seal" | tenant | key_id | request_id | direction)
    nonce    = header.sequence as 12 bytes, big-endian
    payload  = Sealed(header=bytes(SealedHeader), ciphertext=AES-256-GCM(key, nonce, plaintext, aad=header))

Why no nonce repeats under one key: every (request, direction) gets its own key, derived with 16
fresh random bytes of salt, so two streams never share a key even when a caller reuses a request id;
inside one stream the nonce is the sequence number, which the sealer only ever increments, so no
(key, nonce) pair is used twice. A stream is at most 2^64 payloads, far below GCM's limits.

The opener checks everything the header claims against what it expects (version, tenant, key id,
request id, direction, model), that sequences go 0, 1, 2, ... without gaps or repeats, that nothing
follows the final payload, and (`finish`) that the final payload arrived: a reordered, duplicated,
dropped, truncated, tampered or cross-tenant payload is refused with `SealError`, which never
contains key material or plaintext.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from airlock.errors import InvalidRequestError
from airlock.v1 import inference_pb2 as pb

__all__ = ["VERSION", "Opener", "SealError", "Sealer", "StreamKey"]

VERSION = 1
KEY_BYTES = 32
_SALT_BYTES = 16


class SealError(InvalidRequestError):
    """A sealed payload that is not what it claims, or not in its place; `reason` says which."""

    default_reason = "SEAL_INVALID"


@dataclass(frozen=True)
class StreamKey:
    """What identifies one direction of one request: everything the header must match."""

    tenant: str
    key_id: str
    request_id: str
    direction: int  # pb.DIRECTION_REQUEST or pb.DIRECTION_RESPONSE
    model: str = ""


def _derive(secret: bytes, salt: bytes, ident: StreamKey) -> AESGCM:
    if len(secret) != KEY_BYTES:
        raise ValueError("sealing keys are 32 bytes")
    info = b"|".join(
        [b"airlock/v1/seal", ident.tenant.encode(), ident.key_id.encode(), ident.request_id.encode(),
         str(ident.direction).encode()]
    )  # fmt: skip
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
    return AESGCM(hkdf.derive(secret))


def _nonce(sequence: int) -> bytes:
    return sequence.to_bytes(12, "big")


class Sealer:
    """Seals one direction of one request, payload after payload."""

    def __init__(self, secret: bytes, ident: StreamKey) -> None:
        self.ident = ident
        self._salt = os.urandom(_SALT_BYTES)
        self._aead = _derive(secret, self._salt, ident)
        self._sequence = 0
        self._closed = False

    def seal(self, plaintext: bytes, *, final: bool = False) -> pb.Sealed:
        if self._closed:
            raise RuntimeError("this stream was already finished")
        header = pb.SealedHeader(
            version=VERSION, tenant=self.ident.tenant, key_id=self.ident.key_id,
            request_id=self.ident.request_id, direction=self.ident.direction,  # type: ignore[arg-type]
            sequence=self._sequence, final=final, salt=self._salt, model=self.ident.model,
        ).SerializeToString(deterministic=True)  # fmt: skip
        ciphertext = self._aead.encrypt(_nonce(self._sequence), plaintext, header)
        self._sequence += 1
        self._closed = final
        return pb.Sealed(header=header, ciphertext=ciphertext)


class Opener:
    """Opens one direction of one request, refusing anything out of place."""

    def __init__(self, secret: bytes, ident: StreamKey) -> None:
        self.ident = ident
        self._secret = secret
        self._aead: AESGCM | None = None
        self._salt = b""
        self._next = 0
        self.finished = False

    @staticmethod
    def header_of(sealed: pb.Sealed) -> pb.SealedHeader:
        header = pb.SealedHeader()
        try:
            header.ParseFromString(sealed.header)
        except DecodeError:
            raise SealError("sealed header is malformed", reason="SEAL_MALFORMED") from None
        return header

    def open(self, sealed: pb.Sealed) -> bytes:
        header = self.header_of(sealed)
        self._check(header)
        if self._aead is None:
            self._salt = header.salt
            self._aead = _derive(self._secret, header.salt, self.ident)
        elif header.salt != self._salt:
            raise SealError("sealed payload belongs to another stream", reason="SEAL_WRONG_STREAM")
        try:
            plaintext = self._aead.decrypt(_nonce(header.sequence), sealed.ciphertext, sealed.header)
        except InvalidTag:
            raise SealError("sealed payload failed authentication", reason="SEAL_TAMPERED") from None
        self._next += 1
        self.finished = header.final
        return plaintext

    def _check(self, header: pb.SealedHeader) -> None:
        i = self.ident
        if header.version != VERSION:
            raise SealError(f"unsupported envelope version {header.version}", reason="SEAL_VERSION")
        if header.tenant != i.tenant:
            raise SealError("sealed payload belongs to another tenant", reason="SEAL_WRONG_TENANT")
        if header.key_id != i.key_id:
            raise SealError("sealed under another key", reason="SEAL_WRONG_KEY")
        if (header.request_id, header.direction, header.model) != (i.request_id, i.direction, i.model):
            raise SealError("sealed payload belongs to another request", reason="SEAL_WRONG_REQUEST")
        if self.finished:
            raise SealError("sealed payload after the final one", reason="SEAL_AFTER_FINAL")
        if header.sequence != self._next:
            raise SealError(
                f"sealed payload out of order (got {header.sequence}, expected {self._next})",
                reason="SEAL_OUT_OF_ORDER",
            )
        if len(header.salt) != _SALT_BYTES:
            raise SealError("sealed header has a bad salt", reason="SEAL_MALFORMED")

    def finish(self) -> None:
        """Call when the stream ended: refuses a stream whose final payload never came."""
        if not self.finished:
            raise SealError("sealed stream ended before its final payload", reason="SEAL_TRUNCATED")
