"""Property tests (hypothesis) of the two parsers every untrusted byte goes through first: the sealed
envelope and request validation."""

from __future__ import annotations

import contextlib
import math

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock.envelope import VERSION, Opener, Sealer, SealError, StreamKey
from airlock.errors import InvalidRequestError
from airlock.types import ROLES, GenerationSpec, Limits, check_request_id, new_request_id, validate_request
from airlock.v1 import inference_pb2 as pb

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = bytes(range(32))
IDENT = StreamKey("acme", "k1", "req-1", pb.DIRECTION_REQUEST, "echo")

texts = st.text(max_size=40)
payloads = st.lists(st.binary(max_size=200), min_size=1, max_size=5)


def sealed_stream(chunks: list[bytes]) -> list[pb.Sealed]:
    sealer = Sealer(SECRET, IDENT)
    return [sealer.seal(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)]


@SETTINGS
@given(payloads)
def test_round_trip(chunks: list[bytes]) -> None:
    opener = Opener(SECRET, IDENT)
    assert [opener.open(s) for s in sealed_stream(chunks)] == chunks
    opener.finish()


@SETTINGS
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_with_seal_error_only(header: bytes, ciphertext: bytes) -> None:
    try:
        Opener(SECRET, IDENT).open(pb.Sealed(header=header, ciphertext=ciphertext))
    except SealError:
        return
    raise AssertionError("arbitrary bytes opened")


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_wire_bytes_parse_or_fail_cleanly_then_are_refused(data: bytes) -> None:
    try:
        sealed = pb.Sealed.FromString(data)  # what gRPC does with the request bytes
    except DecodeError:
        return
    try:
        Opener(SECRET, IDENT).open(sealed)
    except SealError:
        return
    raise AssertionError("arbitrary wire bytes opened")


@SETTINGS
@given(
    version=st.sampled_from([VERSION, 0, 2, 2**32 - 1]),
    tenant=st.sampled_from(["acme", "globex", ""]) | texts,
    key_id=st.sampled_from(["k1", "k2"]) | texts,
    request_id=st.sampled_from(["req-1", "req-2"]),
    direction=st.sampled_from([pb.DIRECTION_REQUEST, pb.DIRECTION_RESPONSE]) | st.integers(0, 1000),
    sequence=st.integers(0, 2**64 - 1),
    final=st.booleans(),
    salt=st.binary(min_size=0, max_size=32),
    model=st.sampled_from(["echo", "other", ""]),
    ciphertext=st.binary(max_size=64),
)
def test_well_formed_headers_without_the_key_are_refused(
    version: int, tenant: str, key_id: str, request_id: str, direction: int, sequence: int,
    final: bool, salt: bytes, model: str, ciphertext: bytes,
) -> None:  # fmt: skip
    header = pb.SealedHeader(
        version=version, tenant=tenant, key_id=key_id, request_id=request_id, direction=direction,  # type: ignore[arg-type]
        sequence=sequence, final=final, salt=salt, model=model,
    ).SerializeToString()  # fmt: skip
    try:
        Opener(SECRET, IDENT).open(pb.Sealed(header=header, ciphertext=ciphertext))
    except SealError:
        return
    raise AssertionError("a forged header opened")


@SETTINGS
@given(payloads, st.data())
def test_any_single_bit_flip_is_refused(chunks: list[bytes], data: st.DataObject) -> None:
    stream = sealed_stream(chunks)
    index = data.draw(st.integers(0, len(stream) - 1), label="payload")
    part = data.draw(st.sampled_from(["header", "ciphertext"]), label="part")
    raw = bytearray(getattr(stream[index], part))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    flipped = pb.Sealed()
    flipped.CopyFrom(stream[index])
    setattr(flipped, part, bytes(raw))
    stream[index] = flipped
    opener = Opener(SECRET, IDENT)
    try:
        for sealed in stream:
            opener.open(sealed)
        opener.finish()
    except SealError as exc:
        assert SECRET.hex() not in str(exc)
        return
    raise AssertionError(f"a bit flip in {part} of payload {index} went unnoticed")


# --- request validation ----------------------------------------------------------------------------

LIMITS = st.builds(
    Limits,
    max_tokens=st.integers(1, 600),
    default_max_tokens=st.integers(1, 600),
    max_messages=st.integers(1, 6),
    max_stop=st.integers(0, 4),
    max_stop_chars=st.integers(1, 10),
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
REQUEST_ID_CHARS = "abcXYZ019._-"
request_ids = st.text(alphabet=REQUEST_ID_CHARS + "/ é\x00", max_size=70)
MODEL_CHARS = "abz09-"
models = st.one_of(
    st.text(alphabet=MODEL_CHARS, max_size=66), st.text(alphabet=MODEL_CHARS + "A_.é\n\x00", max_size=8)
)
messages = st.lists(
    st.builds(
        pb.ChatMessage,
        role=st.sampled_from([*sorted(ROLES), "robot", "", "User"]),
        content=st.text(alphabet=" \t\nab", max_size=6),
    ),
    max_size=8,
)


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(request_ids), model=draw(models), messages=draw(messages))
    params = req.params
    if draw(st.booleans()):
        params.max_tokens = draw(st.integers(-5, 700))
    if draw(st.booleans()):
        params.temperature = draw(floats)
    if draw(st.booleans()):
        params.top_p = draw(floats)
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**31 - 1))
    params.stop.extend(draw(st.lists(st.text(max_size=12), max_size=6)))
    if draw(st.integers(0, 9)) == 0:
        req.sealed_messages.header = draw(st.binary(max_size=8))
    return req


def checked(req: pb.GenerateRequest, limits: Limits) -> GenerationSpec:
    """What a server checks of a request: its id (the interceptor, serving/rpc.py), then the rest."""
    return validate_request(req, limits, check_request_id(req.request_id or new_request_id()))


def allowed(req: pb.GenerateRequest, limits: Limits) -> bool:
    """What the limits allow, written out independently of the validator."""
    rid = req.request_id
    if rid and not (len(rid) <= 64 and all(c in REQUEST_ID_CHARS for c in rid)):
        return False
    model = req.model
    if model and not (len(model) <= 63 and all(c in MODEL_CHARS for c in model) and model[0] != "-"):
        return False
    p = req.params
    max_tokens = p.max_tokens if p.HasField("max_tokens") else limits.default_max_tokens
    temperature = p.temperature if p.HasField("temperature") else 0.7
    top_p = p.top_p if p.HasField("top_p") else 1.0
    sampling_ok = (
        1 <= max_tokens <= limits.max_tokens
        and not math.isnan(temperature) and 0.0 <= temperature <= 2.0
        and not math.isnan(top_p) and 0.0 < top_p <= 1.0
        and len(p.stop) <= limits.max_stop
        and all(1 <= len(s) <= limits.max_stop_chars for s in p.stop)
    )  # fmt: skip
    if req.HasField("sealed_messages"):  # only the worker can open and check sealed messages
        return not req.messages and sampling_ok
    return (
        0 < len(req.messages) <= limits.max_messages
        and all(m.role in ("system", "user", "assistant") for m in req.messages)
        and any(m.content.strip(" \t\n") for m in req.messages)
        and sampling_ok
    )


@SETTINGS
@given(requests(), LIMITS)
def test_validation_accepts_exactly_what_the_limits_allow(req: pb.GenerateRequest, limits: Limits) -> None:
    try:
        spec = checked(req, limits)
    except InvalidRequestError as exc:
        assert not allowed(req, limits), f"refused an allowed request: {exc}"
        assert exc.field  # always names the field at fault
        return
    assert allowed(req, limits), "accepted a request the limits do not allow"
    assert 1 <= spec.sampling.max_tokens <= limits.max_tokens
    assert len(spec.messages) == (0 if req.HasField("sealed_messages") else len(req.messages))


@SETTINGS
@given(st.binary(max_size=300), LIMITS)
def test_validation_never_crashes_on_wire_bytes(data: bytes, limits: Limits) -> None:
    try:
        req = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return
    with contextlib.suppress(InvalidRequestError):
        checked(req, limits)
