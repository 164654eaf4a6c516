"""Domain types shared by the SDK, gateway and workers, and the one place requests are validated.

Protobuf is the wire format; these frozen dataclasses are what the code around it works with.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from airlock.errors import InvalidRequestError
from airlock.v1 import inference_pb2 as pb

__all__ = [
    "MODEL_NAME",
    "Chunk",
    "Completion",
    "GenerationSpec",
    "Limits",
    "Message",
    "Sampling",
    "check_messages",
    "check_model",
    "check_request_id",
    "check_sampling",
    "new_request_id",
    "validate_request",
]

REQUEST_ID_HEADER = "x-request-id"  # metadata carrying the request id, both ways
ROLES = frozenset({"system", "user", "assistant"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# What a configured model may be called (gateway/config/__init__.py refuses any other [models.NAME]), so a
# name outside it can't name a model: it is refused before anything logs, audits or counts it.
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
FINISH_CODES = {name: code for code, name in FINISH_REASONS.items()}


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_request_id(request_id: str) -> str:
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequestError(
            "request_id must be 1..64 characters of A-Z a-z 0-9 . _ -",
            reason="REQUEST_ID_INVALID",
            field="request_id",
        )
    return request_id


def check_model(model: str) -> str:
    """A requested model name: "" (the tenant's default) or 1..63 of a-z 0-9 - (not starting with -).

    Called by `validate_request` and, on the gateway, before authorization puts `model:NAME` in an
    audit record; the refusal never repeats the name."""
    if model and not MODEL_NAME.fullmatch(model):
        raise InvalidRequestError(
            "model must be 1..63 characters of a-z 0-9 - (not starting with -)",
            reason="MODEL_INVALID",
            field="model",
        )
    return model


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters after defaults were applied."""

    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_proto(self) -> pb.SamplingParams:
        """Every parameter explicit: what was validated is what the worker is asked for."""
        params = pb.SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop
        )
        if self.seed is not None:
            params.seed = self.seed
        return params


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; configured per deployment."""

    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_messages: int = 256
    max_stop: int = 4
    max_stop_chars: int = 64


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request: what an engine is asked to do."""

    request_id: str
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling


@dataclass(frozen=True)
class Completion:
    """A whole answer, as the SDK returns it."""

    request_id: str
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One streamed piece; `finish_reason` and token totals are set on the last one only."""

    request_id: str
    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def validate_request(req: pb.GenerateRequest, limits: Limits, request_id: str) -> GenerationSpec:
    """Check a request against the limits; raise InvalidRequestError naming the field at fault.

    `request_id` is the call's, resolved and checked once by the server's interceptor
    (`serving.rpc.request_id_of`); the request itself is only read."""
    model = check_model(req.model)
    if req.HasField("sealed_messages"):  # end to end: only the worker can open and check them
        if req.messages:
            raise InvalidRequestError("send messages or sealed_messages, not both", field="messages")
        return GenerationSpec(request_id, model, (), check_sampling(req.params, limits))
    return GenerationSpec(
        request_id=request_id,
        model=model,
        messages=check_messages(req.messages, limits),
        sampling=check_sampling(req.params, limits),
    )


def check_messages(messages: Sequence[pb.ChatMessage], limits: Limits) -> tuple[Message, ...]:
    """A conversation within the limits: 1..max_messages messages of known roles, not all empty."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", field="messages")
    if len(messages) > limits.max_messages:
        raise InvalidRequestError(f"at most {limits.max_messages} messages are allowed", field="messages")
    checked = []
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise InvalidRequestError(
                "role must be one of system, user, assistant", field=f"messages[{i}].role"
            )
        checked.append(Message(msg.role, msg.content))
    if not any(m.content.strip() for m in checked):
        raise InvalidRequestError("messages have no content", field="messages")
    return tuple(checked)


def check_sampling(params: pb.SamplingParams, limits: Limits) -> Sampling:
    """Sampling parameters within the limits, with defaults applied (here, once)."""
    max_tokens = params.max_tokens if params.HasField("max_tokens") else limits.default_max_tokens
    if not 0 < max_tokens <= limits.max_tokens:
        raise InvalidRequestError(
            f"max_tokens must be between 1 and {limits.max_tokens}", field="params.max_tokens"
        )
    temperature = params.temperature if params.HasField("temperature") else Sampling.temperature
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError("temperature must be in [0, 2]", field="params.temperature")
    top_p = params.top_p if params.HasField("top_p") else Sampling.top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError("top_p must be in (0, 1]", field="params.top_p")
    if len(params.stop) > limits.max_stop:
        raise InvalidRequestError(f"at most {limits.max_stop} stop strings are allowed", field="params.stop")
    for s in params.stop:
        if not 0 < len(s) <= limits.max_stop_chars:
            raise InvalidRequestError(
                f"each stop string must be 1..{limits.max_stop_chars} characters",
                field="params.stop",
            )
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
    )
