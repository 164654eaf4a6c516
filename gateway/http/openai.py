"""OpenAI's JSON, translated to and from Airlock's domain types, and nothing else.

A chat completion request becomes the `GenerateRequest` a gRPC caller would send, so the guard
validates it with the same code (`airlock.types.validate_request`) and the pipeline serves it the
same way; an answer or a chunk comes back as OpenAI's `chat.completion` / `chat.completion.chunk`.
What the gateway can't honour is refused, never ignored: a field OpenAI defines is accepted only
when it asks for what the gateway does anyway (absent, null, or its default: `n` = 1, penalties 0,
no logprobs) and refused otherwise with `UNSUPPORTED_FIELD`, naming it; a field OpenAI does not
define is refused without repeating its name (callers' strings are never echoed). Errors take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the Airlock reason as `code`
and the HTTP status gRPC's code maps to (Google's mapping, plus 404 for an unknown model, 413 for a
body over the limit and 408 for one that is too slow).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from airlock.errors import AirlockError, InvalidRequestError, QuotaExceededError
from airlock.types import FINISH_REASONS
from airlock.v1 import inference_pb2 as pb

__all__ = [
    "ChatRequest",
    "chat_request",
    "completion",
    "error_response",
    "models_list",
    "stream_chunks",
]

_INT32, _INT64 = 2**31 - 1, 2**63 - 1
# Fields of OpenAI's chat completion request the door serves.
SERVED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "n", "stream", "stream_options",
})  # fmt: skip
# Fields OpenAI defines that ask for nothing at these values (clients send them filled in): accepted.
AT_DEFAULT: Mapping[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logprobs": (False,),
    "parallel_tool_calls": (True, False),  # without tools there is nothing to call
    "tool_choice": ("none",),
    "store": (False,),
}
# The rest of OpenAI's request fields: named when refused (their names are ours to repeat).
REFUSED = frozenset({
    "audio", "function_call", "functions", "logit_bias", "metadata", "modalities", "prediction",
    "reasoning_effort", "response_format", "service_tier", "tools", "top_logprobs", "user",
    "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
})  # fmt: skip
MESSAGE_FIELDS = frozenset({"role", "content"})
MESSAGE_REFUSED = frozenset({"name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"})
ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
# gRPC status -> HTTP status (Google's canonical mapping); a few reasons have a more precise one.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
REASON_STATUS = {"UNKNOWN_MODEL": 404, "BODY_TOO_LARGE": 413, "BODY_TIMEOUT": 408, "HEADERS_TOO_LARGE": 431}
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "invalid_request_error", 431: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable_error", 504: "timeout_error",
}  # fmt: skip


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request as the gateway serves it."""

    request: pb.GenerateRequest  # what a gRPC caller would have sent
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def _invalid(message: str, param: str, reason: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, reason=reason, field=param)


def _unsupported(param: str) -> InvalidRequestError:
    return _invalid(f"{param!r} is not supported by this gateway", param, "UNSUPPORTED_FIELD")


def _refuse_extra(
    body: Mapping[str, Any], served: frozenset[str], where: str = "", known: frozenset[str] = REFUSED
) -> None:
    for key, value in body.items():
        if key in served or value is None or (key in AT_DEFAULT and value in AT_DEFAULT[key]):
            continue
        if key in known or key in AT_DEFAULT:
            raise _unsupported(where + key)
        raise InvalidRequestError(
            "the request has a field the chat completions API does not define", reason="UNSUPPORTED_FIELD"
        )


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"{key!r} must be a number", key)
    if abs(value) > 1e6:
        raise _invalid(f"{key!r} is out of range", key)
    return float(value)


def _integer(body: Mapping[str, Any], key: str, bound: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{key!r} must be an integer", key)
    if not -bound - 1 <= value <= bound:
        raise _invalid(f"{key!r} is out of range", key)
    return value


def _content(value: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (joined, as OpenAI does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _unsupported(param)  # images, audio, files
            _refuse_extra(part, frozenset({"type", "text"}), f"{param}.")
            if not isinstance(part.get("text"), str):
                raise _invalid("a text part's 'text' must be a string", param)
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid("a message's content must be a string or a list of text parts", param)


def _messages(value: Any) -> list[pb.ChatMessage]:
    if not isinstance(value, list):
        raise _invalid("'messages' must be a list of messages", "messages")
    out = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid("each message must be an object", param)
        _refuse_extra(message, MESSAGE_FIELDS, f"{param}.", MESSAGE_REFUSED)
        role = message.get("role")
        if not isinstance(role, str):
            raise _invalid("a message's role must be a string", f"{param}.role")
        content = _content(message.get("content"), f"{param}.content")
        out.append(pb.ChatMessage(role=ROLES.get(role, role), content=content))
    return out


def chat_request(body: Any) -> ChatRequest:
    """Translate a decoded chat completion request; raises `InvalidRequestError` naming the param.

    Only the shape is checked here; values are checked by the one validation every call gets,
    after the caller is authorized (`airlock.types.validate_request`, through the guard)."""
    try:
        return _chat_request(body)
    except UnicodeEncodeError:  # JSON may spell lone surrogates, which no UTF-8 message can hold
        raise InvalidRequestError(
            "the body holds text that is not valid Unicode", reason="MALFORMED_REQUEST"
        ) from None


def _chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object", reason="MALFORMED_REQUEST")
    _refuse_extra(body, SERVED)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("'model' must be a string", "model")
    if _integer(body, "n", _INT32) not in (None, 1):
        raise _invalid("only n = 1 is supported", "n", "UNSUPPORTED_FIELD")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict):
            raise _invalid("'stream_options' must be an object", "stream_options")
        _refuse_extra(options, frozenset({"include_usage"}), "stream_options.")
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise _invalid("'include_usage' must be a boolean", "stream_options.include_usage")
        include_usage = bool(usage)
    params = pb.SamplingParams()
    max_tokens = _integer(body, "max_tokens", _INT32)
    max_completion = _integer(body, "max_completion_tokens", _INT32)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise _invalid("send max_completion_tokens or max_tokens, not both", "max_completion_tokens")
    if (chosen := max_completion if max_completion is not None else max_tokens) is not None:
        params.max_tokens = chosen
    if (temperature := _number(body, "temperature")) is not None:
        params.temperature = temperature
    if (top_p := _number(body, "top_p")) is not None:
        params.top_p = top_p
    if (seed := _integer(body, "seed", _INT64)) is not None:
        params.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        params.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params.stop.extend(stop)
    elif stop is not None:
        raise _invalid("'stop' must be a string or a list of strings", "stop")
    request = pb.GenerateRequest(model=model or "", messages=_messages(body.get("messages")), params=params)
    return ChatRequest(request, bool(stream), include_usage)


# -- answers ----------------------------------------------------------------------------------------


def _usage(usage: pb.Usage) -> dict[str, int]:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(response: pb.GenerateResponse, model: str) -> bytes:
    """A `chat.completion` object for a whole answer."""
    return json.dumps({
        "id": f"chatcmpl-{response.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": response.text},
            "finish_reason": FINISH_REASONS.get(response.finish_reason, "stop"),
            "logprobs": None,
        }],
        "usage": _usage(response.usage),
    }).encode()  # fmt: skip


class stream_chunks:
    """The `chat.completion.chunk` events of one stream, as Server-Sent Events lines."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self._head = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk",
                      "created": int(time.time()), "model": model}  # fmt: skip
        self._first = True

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {**self._head, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def chunk(self, chunk: pb.GenerateChunk) -> bytes:
        """The events for one chunk of the pipeline's: its text, and the finish reason (and the
        usage, when asked for) on the last one."""
        delta: dict[str, str] = {"content": chunk.text}
        if self._first:
            delta = {"role": "assistant", **delta}
            self._first = False
        out = [self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])]
        if chunk.finish_reason:
            finish = FINISH_REASONS.get(chunk.finish_reason, "stop")
            out.append(self._event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
            if self.include_usage:
                out.append(self._event([], _usage(chunk.usage)))
        return b"".join(out)

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"

    @staticmethod
    def error(err: AirlockError, request_id: str) -> bytes:
        """An error after the stream started (its status was 200): one event, then the end."""
        _, body, _ = error_response(err, request_id)
        return b"data: " + body + b"\n\n"


def models_list(models: list[pb.ModelInfo], tenant: str) -> bytes:
    """The models the caller may use, as OpenAI's model list."""
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": tenant} for m in models]
    return json.dumps({"object": "list", "data": data}).encode()


def _param(field: str) -> str | None:
    if not field or field == "request_id":
        return None  # the request id travels in the x-request-id header here
    return field.removeprefix("params.")


def error_response(err: AirlockError, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(HTTP status, OpenAI error body, extra headers) for an Airlock error. The message is the
    one the gRPC door sends (never a token, a key or a payload), with the request id."""
    status = REASON_STATUS.get(err.reason) or HTTP_STATUS.get(err.code, 500)
    headers: list[tuple[bytes, bytes]] = []
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status in (429, 503) or (isinstance(err, QuotaExceededError) and err.retry_after is not None):
        retry_after = err.retry_after if isinstance(err, QuotaExceededError) else None
        seconds = max(1, math.ceil(retry_after)) if retry_after is not None else 1
        headers.append((b"retry-after", str(seconds).encode()))
    param = _param(err.field) if isinstance(err, InvalidRequestError) else None
    body = {
        "error": {
            "message": err.message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": err.reason,
            "request_id": request_id,
        }
    }
    return status, json.dumps(body).encode(), headers
