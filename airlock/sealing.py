"""Sealing a request's conversation and its answer, shared by the SDK (end to end), the gateway
(gateway-sealed default) and the worker. Built on `airlock.envelope`; these functions change no
message they are given: they return what they make."""

from __future__ import annotations

from collections.abc import Iterable

from airlock.envelope import Opener, Sealer, StreamKey
from airlock.v1 import inference_pb2 as pb

__all__ = ["E2E_KEY_ID", "e2e_info", "open_prompt", "request_key", "response_key", "seal_prompt"]

E2E_KEY_ID = "e2e"  # the key id of an end-to-end request key (no tenant key involved)


def e2e_info(tenant: str, request_id: str, model: str) -> bytes:
    """HPKE `info` for an end-to-end request key: binds it to one tenant, request and model."""
    return b"|".join([b"airlock/v1/e2e", tenant.encode(), request_id.encode(), model.encode()])


def request_key(tenant: str, key_id: str, request_id: str, model: str) -> StreamKey:
    return StreamKey(tenant, key_id, request_id, pb.DIRECTION_REQUEST, model)


def response_key(tenant: str, key_id: str, request_id: str, model: str) -> StreamKey:
    return StreamKey(tenant, key_id, request_id, pb.DIRECTION_RESPONSE, model)


def seal_prompt(messages: Iterable[pb.ChatMessage], key: StreamKey, secret: bytes) -> pb.Sealed:
    """The conversation sealed under `secret` for the request `key` names (one final payload)."""
    prompt = pb.SealedPrompt(messages=messages).SerializeToString()
    return Sealer(secret, key).seal(prompt, final=True)


def open_prompt(sealed: pb.Sealed, key: StreamKey, secret: bytes) -> pb.SealedPrompt:
    """The conversation `seal_prompt` sealed; a `SealError` for anything out of place."""
    opener = Opener(secret, key)
    prompt = pb.SealedPrompt()
    prompt.ParseFromString(opener.open(sealed))
    opener.finish()
    return prompt
