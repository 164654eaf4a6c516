"""The sealed envelope refuses every payload that is not exactly what and where it claims to be."""

from __future__ import annotations

import os

import pytest

from airlock.envelope import Opener, Sealer, SealError, StreamKey
from airlock.v1 import inference_pb2 as pb

KEY = os.urandom(32)
IDENT = StreamKey("acme", "acme-k1", "req-1", pb.DIRECTION_RESPONSE, "smollm2")


def stream(n: int = 3, ident: StreamKey = IDENT, key: bytes = KEY) -> list[pb.Sealed]:
    sealer = Sealer(key, ident)
    return [sealer.seal(f"part {i}".encode(), final=i == n - 1) for i in range(n)]


def open_all(payloads: list[pb.Sealed], ident: StreamKey = IDENT, key: bytes = KEY) -> list[bytes]:
    opener = Opener(key, ident)
    out = [opener.open(p) for p in payloads]
    opener.finish()
    return out


def reason(payloads: list[pb.Sealed], ident: StreamKey = IDENT, key: bytes = KEY) -> str:
    with pytest.raises(SealError) as err:
        open_all(payloads, ident, key)
    return err.value.reason


def test_a_stream_round_trips() -> None:
    assert open_all(stream()) == [b"part 0", b"part 1", b"part 2"]


def test_a_flipped_ciphertext_bit_is_refused() -> None:
    payloads = stream()
    tampered = bytearray(payloads[1].ciphertext)
    tampered[0] ^= 1
    payloads[1] = pb.Sealed(header=payloads[1].header, ciphertext=bytes(tampered))
    assert reason(payloads) == "SEAL_TAMPERED"


def test_a_header_edit_is_refused_even_when_it_names_the_right_stream() -> None:
    payloads = stream()
    header = pb.SealedHeader.FromString(payloads[0].header)
    header.final = True  # claim the stream ended after the first payload (truncation attempt)
    payloads[0] = pb.Sealed(header=header.SerializeToString(), ciphertext=payloads[0].ciphertext)
    assert reason(payloads[:1]) == "SEAL_TAMPERED"


@pytest.mark.parametrize(
    ("order", "expected"),
    [([1, 0, 2], "SEAL_OUT_OF_ORDER"), ([0, 0, 1, 2], "SEAL_OUT_OF_ORDER"), ([0, 2], "SEAL_OUT_OF_ORDER"),
     ([0, 1], "SEAL_TRUNCATED"), ([0, 1, 2, 2], "SEAL_AFTER_FINAL")],
    ids=["reordered", "duplicated", "dropped", "truncated", "after-final"],
)  # fmt: skip
def test_stream_order_is_enforced(order: list[int], expected: str) -> None:
    payloads = stream()
    assert reason([payloads[i] for i in order]) == expected


def test_a_payload_from_another_stream_of_the_same_request_is_refused() -> None:
    first, second = stream(), stream()  # same ident, fresh salt each time
    assert reason([first[0], second[1], first[2]]) in {"SEAL_WRONG_STREAM", "SEAL_TAMPERED"}


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (StreamKey("globex", "acme-k1", "req-1", pb.DIRECTION_RESPONSE, "smollm2"), "SEAL_WRONG_TENANT"),
        (StreamKey("acme", "acme-k2", "req-1", pb.DIRECTION_RESPONSE, "smollm2"), "SEAL_WRONG_KEY"),
        (StreamKey("acme", "acme-k1", "req-2", pb.DIRECTION_RESPONSE, "smollm2"), "SEAL_WRONG_REQUEST"),
        (StreamKey("acme", "acme-k1", "req-1", pb.DIRECTION_REQUEST, "smollm2"), "SEAL_WRONG_REQUEST"),
        (StreamKey("acme", "acme-k1", "req-1", pb.DIRECTION_RESPONSE, "other"), "SEAL_WRONG_REQUEST"),
    ],
)
def test_a_payload_is_only_opened_where_it_belongs(other: StreamKey, expected: str) -> None:
    assert reason(stream(), ident=other) == expected


def test_another_tenants_key_cannot_open_even_with_a_matching_header() -> None:
    assert reason(stream(), key=os.urandom(32)) == "SEAL_TAMPERED"


def test_a_reused_request_id_still_gets_fresh_keys_and_distinct_ciphertexts() -> None:
    a, b = Sealer(KEY, IDENT).seal(b"same"), Sealer(KEY, IDENT).seal(b"same")
    assert pb.SealedHeader.FromString(a.header).salt != pb.SealedHeader.FromString(b.header).salt
    assert a.ciphertext != b.ciphertext


def test_errors_never_carry_plaintext_or_keys() -> None:
    payloads = stream()
    payloads[0] = pb.Sealed(header=payloads[0].header, ciphertext=b"\0" * 32)
    with pytest.raises(SealError) as err:
        open_all(payloads)
    text = str(err.value)
    assert "part" not in text and KEY.hex() not in text


def test_a_finished_sealer_refuses_more() -> None:
    sealer = Sealer(KEY, IDENT)
    sealer.seal(b"end", final=True)
    with pytest.raises(RuntimeError):
        sealer.seal(b"more")
