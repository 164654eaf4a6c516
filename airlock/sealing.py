"""Sealing a request's conversation and its answer, shared by the SDK (end to end), the gateway
(gateway-sealed default) and the worker. Built on `airlock.envelope`."""

from __future__ import annotations

from airlock.envelope import Opener, Sealer, SealError, StreamKey
from airlock.v1 import inference_pb2 as pb

__all__ = ["E2E_KEY_ID", "e2e_info", "open_prompt", "request_key", "response_key", "seal_prompt"]

E2E_KEY_ID = "e2e"  # the key id of an end-to-end request key (no tenant key involved)


def e2e_info(tenant: str, request_id: str, model: str) -> bytes:
    """HPKE `info` for an end-to-end request key: binds it to one tenant, request and model."""
    return b"|".join([b"airlock/v1/e2e", tenant.encode(), request_id.encode(), model.encode()])


def request_key(tenant: str, key_id: str, request: pb.GenerateRequest) -> StreamKey:
    return StreamKey(tenant, key_id, request.request_id, pb.DIRECTION_REQUEST, request.model)


def response_key(tenant: str, key_id: str, request: pb.GenerateRequest) -> StreamKey:
    return StreamKey(tenant, key_id, request.request_id, pb.DIRECTION_RESPONSE, request.model)


def seal_prompt(request: pb.GenerateRequest, tenant: str, key_id: str, secret: bytes) -> None:
    """Move `request.messages` into `request.sealed_messages` (request id and model must be set)."""
    prompt = pb.SealedPrompt(messages=request.messages).SerializeToString()
    request.sealed_messages.CopyFrom(
        Sealer(secret, request_key(tenant, key_id, request)).seal(prompt, final=True)
    )
    del request.messages[:]


def open_prompt(request: pb.GenerateRequest, tenant: str, key_id: str, secret: bytes) -> None:
    """Move `request.sealed_messages` back into `request.messages`, refusing anything out of place."""
    opener = Opener(secret, request_key(tenant, key_id, request))
    prompt = pb.SealedPrompt()
    prompt.ParseFromString(opener.open(request.sealed_messages))
    opener.finish()
    if request.messages:
        raise SealError("a request is either sealed or plain, not both", reason="SEAL_MIXED")
    request.messages.extend(prompt.messages)
    request.ClearField("sealed_messages")
