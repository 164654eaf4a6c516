"""`to_status` and `from_rpc_error` are inverses: class, reason, retry delay and field survive the wire."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import airlock
from airlock.errors import (
    ERROR_DOMAIN,
    AirlockError,
    AttestationError,
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.rpcstatus import from_rpc_error, to_status

Metadata = Sequence[tuple[str, str | bytes]]


class FakeCall:
    """The three methods `from_rpc_error` reads from a failed call."""

    def __init__(self, code: grpc.StatusCode, details: str | None, metadata: Metadata | None) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> Metadata | None:
        return self._metadata


def over_the_wire(err: AirlockError, request_id: str = "") -> AirlockError:
    status = to_status(err, request_id=request_id)
    return from_rpc_error(FakeCall(status.code, status.details, status.trailing_metadata))  # type: ignore[arg-type]


def rich_status(err: AirlockError, request_id: str = "") -> status_pb2.Status:
    ((key, value),) = to_status(err, request_id=request_id).trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


@pytest.mark.parametrize(
    "err",
    [
        AirlockError("boom"),
        AuthenticationError("token expired", reason="TOKEN_EXPIRED"),
        PermissionDeniedError("tenant may not use model", reason="MODEL_NOT_ALLOWED"),
        QuotaExceededError("slow down"),
        UnavailableError("no worker"),
        DeadlineExceededError("too slow"),
        CancelledError("gone"),
        AttestationError("evidence stale", reason="ATTESTATION_STALE"),
        InvalidRequestError("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_class_reason_and_message_round_trip(err: AirlockError) -> None:
    back = over_the_wire(err)
    assert type(back) is type(err)
    assert back.code == err.code
    assert back.reason == err.reason
    assert back.message == err.message


def test_the_status_code_matches_the_error_class() -> None:
    status = to_status(QuotaExceededError("x"))
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_status(QuotaExceededError("x")).code == code_pb2.RESOURCE_EXHAUSTED


def test_error_info_carries_reason_domain_and_request_id() -> None:
    status = rich_status(AuthenticationError("no", reason="TOKEN_EXPIRED"), request_id="req-7")
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "TOKEN_EXPIRED",
        ERROR_DOMAIN,
        {"request_id": "req-7"},
    )


@pytest.mark.parametrize("retry_after", [1.5, 0.25, 0.0, 30.0])
def test_retry_after_round_trips(retry_after: float) -> None:
    back = over_the_wire(QuotaExceededError("later", reason="TENANT_RATE_LIMITED", retry_after=retry_after))
    assert isinstance(back, QuotaExceededError)
    assert back.reason == "TENANT_RATE_LIMITED"
    assert back.retry_after == pytest.approx(retry_after)


def test_retry_after_stays_unknown_when_not_sent() -> None:
    back = over_the_wire(QuotaExceededError("later"))
    assert isinstance(back, QuotaExceededError)
    assert back.retry_after is None


def test_field_round_trips() -> None:
    back = over_the_wire(InvalidRequestError("top_p must be in (0, 1]", field="params.top_p"))
    assert isinstance(back, InvalidRequestError)
    assert back.field == "params.top_p"
    assert back.message == "top_p must be in (0, 1]"


def test_an_oversize_message_refused_by_grpc_itself_is_a_quota_error_with_the_default_reason() -> None:
    # gRPC refuses a message over the size limit itself, with no google.rpc.Status: there is no
    # MessageTooLargeError (it was never raised), just the class's default reason.
    back = from_rpc_error(FakeCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max", None))  # type: ignore[arg-type]
    assert type(back) is QuotaExceededError
    assert (back.reason, back.retry_after) == ("QUOTA_EXCEEDED", None)
    with pytest.raises(AttributeError):
        airlock.MessageTooLargeError  # noqa: B018


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED]
)
def test_unknown_codes_decode_as_the_base_error(code: grpc.StatusCode) -> None:
    back = from_rpc_error(FakeCall(code, "nope", None))  # type: ignore[arg-type]
    assert type(back) is AirlockError
    assert (back.message, back.reason) == ("nope", "INTERNAL")


def test_a_plain_status_without_details_still_decodes() -> None:
    back = from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, None, ()))  # type: ignore[arg-type]
    assert type(back) is UnavailableError
    assert (back.message, back.reason) == ("UNAVAILABLE", "UNAVAILABLE")


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\xff", b"\x12\x05abc"])
def test_malformed_status_details_do_not_hide_the_status_code(garbage: bytes) -> None:
    call = FakeCall(grpc.StatusCode.PERMISSION_DENIED, "denied", [("grpc-status-details-bin", garbage)])
    back = from_rpc_error(call)  # type: ignore[arg-type]
    assert type(back) is PermissionDeniedError
    assert back.message == "denied"


def test_a_well_formed_status_with_a_malformed_detail_still_decodes() -> None:
    bad = any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff")
    status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="denied", details=[bad])
    call = FakeCall(
        grpc.StatusCode.PERMISSION_DENIED, "denied", [("grpc-status-details-bin", status.SerializeToString())]
    )
    back = from_rpc_error(call)  # type: ignore[arg-type]
    assert type(back) is PermissionDeniedError


def test_a_malformed_detail_does_not_hide_the_good_ones() -> None:
    bad = any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff")
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="later", details=[bad, retry])
    metadata = [("grpc-status-details-bin", status.SerializeToString())]
    back = from_rpc_error(FakeCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "later", metadata))  # type: ignore[arg-type]
    assert type(back) is QuotaExceededError
    assert (back.reason, back.retry_after) == ("QUOTA_EXCEEDED", 3.0)


def test_the_request_id_survives_the_wire() -> None:
    status = to_status(UnavailableError("down"), request_id="rid-42")
    err = from_rpc_error(FakeCall(status.code, status.details, status.trailing_metadata))  # type: ignore[arg-type]
    assert err.request_id == "rid-42"
    # Without rich details (a proxy stripped them), the echoed header still names the call.
    bare = from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, "down", [("x-request-id", "rid-43")]))  # type: ignore[arg-type]
    assert bare.request_id == "rid-43"


def test_quota_failure_names_whose_quota_and_round_trips() -> None:
    err = QuotaExceededError("token quota exceeded", reason="TOKEN_QUOTA_EXCEEDED", retry_after=3.0,
                             subject="tenant:acme")  # fmt: skip
    status = status_pb2.Status.FromString(dict(to_status(err).trailing_metadata)["grpc-status-details-bin"])
    failures = [d for d in status.details if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR)]
    assert len(failures) == 1
    quota = error_details_pb2.QuotaFailure()
    failures[0].Unpack(quota)
    assert [(v.subject, v.description) for v in quota.violations] == [("tenant:acme", "token quota exceeded")]
    back = over_the_wire(err)
    assert isinstance(back, QuotaExceededError)
    assert (back.subject, back.retry_after, back.reason) == ("tenant:acme", 3.0, "TOKEN_QUOTA_EXCEEDED")
