"""Fuzz harnesses: one function per target taking arbitrary bytes, shared by `make fuzz` (atheris,
coverage-guided) and the corpus replay in `make test` (tests/reliability/test_fuzz_replay.py).

Each harness turns the bytes into inputs for one trust boundary and raises `Finding` (or lets an
unexpected exception escape) when the code under test breaks its contract:

- `envelope`: `Opener.open` refuses anything that is not exactly what the sealer produced, in
  order, with `SealError` only; a stream is either opened intact or refused, never altered.
- `jwt`: `JwtVerifier.verify` (a real Ed25519/ES256 JWKS) answers every token with a `Principal`
  or `AuthenticationError`, nothing else; fuzzed claims are signed with the real key so the checks
  behind the signature are reached too.
"""

from __future__ import annotations

import base64
import functools
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from airlock.envelope import Opener, Sealer, SealError, StreamKey
from airlock.errors import AuthenticationError
from airlock.v1 import inference_pb2 as pb
from gateway.auth.identity import JwtVerifier, Principal
from gateway.config import AuthConfig

__all__ = ["TARGETS", "Finding", "envelope", "jwt_token", "mutations", "seeds"]

SECRET = bytes(range(32))  # a fuzzing-only key: the harness must be deterministic to replay
IDENT = StreamKey("acme", "k1", "req-1", pb.DIRECTION_RESPONSE, "echo")
PLAINTEXTS = (b"first chunk", b"", b"last chunk")
AUTH = AuthConfig()
ISSUER = AUTH.issuers[0].issuer
LIFETIME = 3600  # seeds stay valid tokens: within auth.max_token_lifetime_seconds of their iat


class Finding(AssertionError):
    """The code under test broke its contract for this input."""


class _Reader:
    """Reads small decisions and byte strings from the fuzz input; zeros once it runs out."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0

    def take(self, limit: int = 64) -> bytes:
        n = min(self.byte() % (limit + 1), max(0, len(self.data) - self.pos))
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def rest(self) -> bytes:
        out, self.pos = self.data[self.pos :], len(self.data)
        return out


# --- envelope -------------------------------------------------------------------------------------


def _stream() -> list[pb.Sealed]:
    sealer = Sealer(SECRET, IDENT)
    return [sealer.seal(p, final=i == len(PLAINTEXTS) - 1) for i, p in enumerate(PLAINTEXTS)]


def _open_all(payloads: list[pb.Sealed]) -> list[bytes]:
    opener = Opener(SECRET, IDENT)
    out = [opener.open(p) for p in payloads]
    opener.finish()
    return out


def envelope(data: bytes) -> None:
    r = _Reader(data)
    mode = r.byte() % 3
    if mode == 0:  # arbitrary header and ciphertext bytes
        _expect_refusal(
            lambda: Opener(SECRET, IDENT).open(pb.Sealed(header=r.take(256), ciphertext=r.rest()))
        )
        return
    if mode == 1:  # an arbitrary header message around a real ciphertext
        real = _stream()[0]
        _expect_refusal(
            lambda: Opener(SECRET, IDENT).open(pb.Sealed(header=r.rest(), ciphertext=real.ciphertext))
        )
        return
    # A real stream, mutated: flipped bits, dropped, repeated or swapped payloads.
    original = _stream()
    wire = [(p.header, p.ciphertext) for p in original]
    mutated = list(wire)
    for _ in range(r.byte() % 4):
        if not mutated:
            break
        op, i = r.byte() % 4, r.byte() % len(mutated)
        header, ciphertext = mutated[i]
        if op == 0:
            in_header = r.byte() % 2 == 1
            target = bytearray(header if in_header else ciphertext)
            if target:
                bit = ((r.byte() << 8) | r.byte()) % (len(target) * 8)
                target[bit // 8] ^= 1 << (bit % 8)
                mutated[i] = (bytes(target), ciphertext) if in_header else (header, bytes(target))
        elif op == 1:
            del mutated[i]
        elif op == 2:
            mutated.insert(i, mutated[i])
        else:
            j = r.byte() % len(mutated)
            mutated[i], mutated[j] = mutated[j], mutated[i]
    payloads = [pb.Sealed(header=h, ciphertext=c) for h, c in mutated]
    if mutated == wire:
        if _open_all(payloads) != list(PLAINTEXTS):
            raise Finding("an intact stream did not open to what was sealed")
        return
    _expect_refusal(lambda: _open_all(payloads))


def _expect_refusal(action: Callable[[], object]) -> None:
    try:
        action()
    except SealError as exc:
        for forbidden in (SECRET.hex(), *[p.decode() for p in PLAINTEXTS if p]):
            if forbidden in str(exc):
                raise Finding(f"a SealError names a secret or a plaintext: {exc}") from None
        return
    raise Finding("a forged, altered or reordered sealed payload was accepted")


# --- JWT front door -------------------------------------------------------------------------------


@functools.cache
def _keys() -> tuple[JwtVerifier, dict[str, tuple[str, Any]]]:
    okp = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32))
    p256 = ec.derive_private_key(0x5EED, ec.SECP256R1())
    entries = [
        {**json.loads(OKPAlgorithm.to_jwk(okp.public_key())), "kid": "fz-ed", "alg": "EdDSA"},
        {**json.loads(ECAlgorithm.to_jwk(p256.public_key())), "kid": "fz-ec", "alg": "ES256"},
    ]
    jwks = Path(tempfile.mkdtemp(prefix="airlock-fuzz-")) / "jwks.json"
    jwks.write_text(json.dumps({"keys": entries}))
    verifier = JwtVerifier(AUTH, {ISSUER: jwks}, lambda issuer, tenant: tenant in ("acme", "globex"))
    return verifier, {"fz-ed": ("EdDSA", okp), "fz-ec": ("ES256", p256)}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _value(r: _Reader, valid: Any) -> tuple[bool, Any]:
    """(present, value): the valid value most of the time, else a type or range confusion."""
    choice = r.byte() % 12
    if choice < 5:
        return True, valid
    junk: list[Any] = [
        None,
        True,
        -1,
        2**70,
        1.5e308,
        "",
        r.take().decode("latin-1"),
        [valid],
        {"v": valid},
        [],
    ]
    return (False, None) if choice == 5 else (True, junk[(choice - 6 + r.byte()) % len(junk)])


def _claims_token(r: _Reader) -> str:
    now = int(time.time())
    kid = "fz-ed" if r.byte() % 2 else "fz-ec"
    alg, key = _keys()[1][kid]
    header_valid = {"alg": alg, "kid": kid, "typ": "JWT"}
    claims_valid = {"iss": ISSUER, "aud": AUTH.audience, "sub": "alice", "tenant": "acme",
                    "roles": ["user"], "iat": now, "exp": now + LIFETIME, "nbf": now - 10}  # fmt: skip
    header = {k: v for k, (keep, v) in ((k, _value(r, v)) for k, v in header_valid.items()) if keep}
    claims = {k: v for k, (keep, v) in ((k, _value(r, v)) for k, v in claims_valid.items()) if keep}
    if r.byte() % 8 == 7:  # a header field that must never be honoured
        header[("jku", "x5u", "x5c", "jwk", "crit")[r.byte() % 5]] = "https://attacker.invalid/"
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if alg == "EdDSA":
        signature = key.sign(signing_input.encode())
    else:
        signature = jwt.get_algorithm_by_name("ES256").sign(signing_input.encode(), key)
    if r.byte() % 8 == 7:
        signature = r.take(96)
    return f"{signing_input}.{_b64(signature)}"


def jwt_token(data: bytes) -> None:
    r = _Reader(data)
    mode = r.byte() % 3
    if mode == 0:  # the raw header value (gRPC metadata is text: any byte as latin-1)
        token = r.rest().decode("latin-1")
    elif mode == 1:  # three base64url segments of arbitrary bytes
        token = ".".join(_b64(r.take(512)) for _ in range(3))
    else:
        token = _claims_token(r)
    try:
        principal = _keys()[0].verify(token)
    except AuthenticationError as exc:
        if len(token) > 16 and token in str(exc):
            raise Finding("an authentication error repeats the token") from None
        return
    if not isinstance(principal, Principal) or principal.tenant not in ("acme", "globex"):
        raise Finding(f"accepted a token for an unexpected identity: {principal!r}")


TARGETS: dict[str, Callable[[bytes], None]] = {"envelope": envelope, "jwt": jwt_token}


# --- corpus ---------------------------------------------------------------------------------------


def seeds(target: str) -> list[bytes]:
    """Starting inputs: each mode of the harness with plausible bytes."""
    if target == "envelope":
        real = _stream()[0]
        return [b"\x00" + bytes([16]) + real.header[:16] + real.ciphertext, b"\x01" + real.header,
                b"\x02\x00", b"\x02\x01\x00\x00\x01\x00\x05", b"\x02\x02\x01\x00\x02\x01"]  # fmt: skip
    return [b"\x00eyJhbGciOiJFZERTQSJ9.e30.", b"\x01\x10" + b"{" * 16, b"\x02" + b"\x00" * 40,
            b"\x02\x01" + b"\x00" * 40, b"\x02" + bytes(range(1, 60))]  # fmt: skip


def mutations(target: str, count: int, seed: int = 9) -> Iterator[bytes]:
    """`count` inputs: the seeds, then seeded random flips, cuts, splices and insertions of them."""
    rng = random.Random(seed)
    pool = seeds(target)
    yield from pool
    for _ in range(max(0, count - len(pool))):
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1 and data:
                del data[rng.randrange(len(data)) :]
            elif op == 2:
                data[rng.randrange(len(data) + 1) : 0] = rng.randbytes(rng.randint(1, 32))
            else:
                data += rng.choice(pool)
        yield bytes(data)
