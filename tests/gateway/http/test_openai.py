"""OpenAI's JSON to the domain types and back (gateway/http/openai.py), without a server: what is
mapped, what is refused and how, and the error shape and statuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airlock.errors import (
    AirlockError,
    AttestationError,
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from airlock.v1 import inference_pb2 as pb
from gateway.http.openai import chat_request, completion, error_response, models_list, stream_chunks


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **fields}


def refusal(raw: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        chat_request(raw)
    return info.value


def test_fields_map_onto_the_grpc_request() -> None:
    chat = chat_request({
        "model": "echo",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
        ],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "x",
        "n": 1, "stream": True, "stream_options": {"include_usage": True},
    })  # fmt: skip
    request = chat.request
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "one two")]
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.0, 0.5, 3)
    assert params.HasField("temperature") and list(params.stop) == ["x"]
    assert chat.stream and chat.include_usage
    assert request.request_id == ""  # the door's (x-request-id), set by the guard's resolution


def test_absent_values_stay_absent_for_the_shared_defaults() -> None:
    chat = chat_request({"messages": [{"role": "user", "content": "hi"}], "temperature": None})
    assert chat.request.model == "" and not chat.request.params.HasField("max_tokens")
    assert not chat.request.params.HasField("temperature") and not chat.stream


@pytest.mark.parametrize(
    ("fields", "param", "reason"),
    [
        ({"n": 3}, "n", "UNSUPPORTED_FIELD"),
        ({"tools": []}, "tools", "UNSUPPORTED_FIELD"),
        ({"user": "alice"}, "user", "UNSUPPORTED_FIELD"),
        ({"logprobs": True}, "logprobs", "UNSUPPORTED_FIELD"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "UNSUPPORTED_FIELD"),
        ({"temperature": True}, "temperature", "INVALID_ARGUMENT"),
        ({"temperature": "0.5"}, "temperature", "INVALID_ARGUMENT"),
        ({"max_tokens": 1.5}, "max_tokens", "INVALID_ARGUMENT"),
        ({"max_tokens": 2**40}, "max_tokens", "INVALID_ARGUMENT"),
        ({"seed": 2**70}, "seed", "INVALID_ARGUMENT"),
        ({"stop": [1]}, "stop", "INVALID_ARGUMENT"),
        ({"stream": "yes"}, "stream", "INVALID_ARGUMENT"),
        ({"stream": True, "stream_options": {"chunk_size": 3}}, "", "UNSUPPORTED_FIELD"),
        ({"model": 7}, "model", "INVALID_ARGUMENT"),
        ({"messages": "hi"}, "messages", "INVALID_ARGUMENT"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name",
         "UNSUPPORTED_FIELD"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "INVALID_ARGUMENT"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role", "INVALID_ARGUMENT"),
    ],
)  # fmt: skip
def test_what_cannot_be_served_is_refused_naming_the_param(
    fields: dict[str, Any], param: str, reason: str
) -> None:
    err = refusal(body(**fields))
    assert (err.field, err.reason) == (param, reason)


def test_a_field_openai_does_not_define_is_refused_without_repeating_it() -> None:
    err = refusal(body(**{"secret-canary-key": 1}))
    assert err.reason == "UNSUPPORTED_FIELD" and err.field == ""
    assert "canary" not in str(err)


@pytest.mark.parametrize("raw", [[], "x", 3, None])
def test_a_body_that_is_not_an_object_is_malformed(raw: Any) -> None:
    assert refusal(raw).reason == "MALFORMED_REQUEST"


def test_text_that_no_message_can_hold_is_malformed() -> None:
    assert refusal(body(messages=[{"role": "user", "content": "\ud800"}])).reason == "MALFORMED_REQUEST"


def test_answers_in_openais_shape() -> None:
    response = pb.GenerateResponse(request_id="r1", text="hello", finish_reason=pb.FINISH_REASON_LENGTH,
                                   usage=pb.Usage(prompt_tokens=2, completion_tokens=3))  # fmt: skip
    answer = json.loads(completion(response, "echo"))
    assert answer["id"] == "chatcmpl-r1" and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    listed = json.loads(models_list([pb.ModelInfo(name="echo")], "acme"))
    assert listed == {
        "object": "list",
        "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "acme"}],
    }


def test_stream_events_carry_the_role_first_and_the_usage_last_when_asked() -> None:
    events = stream_chunks("r2", "echo", include_usage=True)
    first = events.chunk(pb.GenerateChunk(text="a"))
    last = events.chunk(pb.GenerateChunk(text="b", finish_reason=pb.FINISH_REASON_STOP,
                                         usage=pb.Usage(prompt_tokens=1, completion_tokens=2)))  # fmt: skip
    decoded = [json.loads(e[len("data: ") :]) for e in (first + last).decode().split("\n\n") if e]
    assert decoded[0]["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert decoded[1]["choices"][0]["delta"] == {"content": "b"}
    assert decoded[2]["choices"][0]["finish_reason"] == "stop"
    assert decoded[3]["choices"] == [] and decoded[3]["usage"]["total_tokens"] == 3
    assert all(d["usage"] is None for d in decoded[:3])
    assert events.done() == b"data: [DONE]\n\n"
    plain = stream_chunks("r3", "echo", include_usage=False).chunk(pb.GenerateChunk(text="a"))
    assert "usage" not in json.loads(plain[len("data: ") :])


@pytest.mark.parametrize(
    ("err", "status", "kind"),
    [
        (InvalidRequestError("bad", field="params.max_tokens"), 400, "invalid_request_error"),
        (InvalidRequestError("no such model", reason="UNKNOWN_MODEL", field="model"), 404, "not_found_error"),
        (AttestationError("weak"), 400, "invalid_request_error"),
        (AuthenticationError("no", reason="TOKEN_MISSING"), 401, "authentication_error"),
        (PermissionDeniedError("no", reason="POLICY_DENIED"), 403, "permission_error"),
        (QuotaExceededError("slow down", reason="RATE_LIMITED", retry_after=0.2), 429, "rate_limit_error"),
        (QuotaExceededError("big", reason="BODY_TOO_LARGE"), 413, "invalid_request_error"),
        (UnavailableError("down", reason="WORKER_UNAVAILABLE"), 503, "service_unavailable_error"),
        (DeadlineExceededError("late"), 504, "timeout_error"),
        (DeadlineExceededError("slow body", reason="BODY_TIMEOUT"), 408, "timeout_error"),
        (AirlockError("internal error (request id r9)"), 500, "server_error"),
    ],
)
def test_errors_get_their_status_type_and_reason(err: AirlockError, status: int, kind: str) -> None:
    got, raw, headers = error_response(err, "r9")
    error = json.loads(raw)["error"]
    assert (got, error["type"], error["code"], error["message"], error["request_id"]) == (
        status, kind, err.reason, err.message, "r9"
    )  # fmt: skip
    extra = dict(headers)
    if status in (429, 503):
        assert int(extra[b"retry-after"]) >= 1  # whole seconds, at least one
    if status == 401:
        assert extra[b"www-authenticate"] == b"Bearer"
    if isinstance(err, InvalidRequestError) and err.field == "params.max_tokens":
        assert error["param"] == "max_tokens"  # OpenAI's name for it
