"""End-to-end sealed mode for the SDK: the prompt is sealed to the worker's attested key, so the
gateway authorizes and routes it without being able to open it, and so is the answer.

The client asks for the worker's evidence through the gateway with a fresh nonce, verifies it
itself (certificate from the deployment CA it trusts, signature, nonce, tenant, level, allowed
measurements), then for each request makes a random 32-byte request key, seals the prompt under it
(`airlock.envelope`) and seals the key to the worker's HPKE public key. The worker seals its answer
under the same request key (the other direction, its own salt); only the client can open it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from airlock.attestation import AttestationPolicy, Verified, hpke_seal, verify
from airlock.envelope import Opener
from airlock.errors import AttestationError
from airlock.sealing import E2E_KEY_ID, e2e_info, request_key, response_key, seal_prompt
from airlock.v1 import inference_pb2 as pb

__all__ = ["EndToEnd"]

Fetch = Callable[[str, bytes], Awaitable[pb.Attestation]]


class EndToEnd:
    def __init__(self, fetch: Fetch, *, ca_pem: bytes, policy: AttestationPolicy) -> None:
        self._fetch = fetch
        self.ca_pem = ca_pem
        self.policy = policy
        self._verified: dict[str, Verified] = {}

    async def attest(self, model: str, tenant: str) -> Verified:
        """Fresh evidence from the worker serving `model` (the default when empty), checked here."""
        nonce = os.urandom(32)
        attestation = await self._fetch(model, nonce)
        verified = verify(
            attestation.evidence, ca_pem=self.ca_pem, nonce=nonce, tenant=tenant, policy=self.policy
        )
        if model and verified.model != model:  # the gateway must not move us to another model
            raise AttestationError(
                "evidence is for another model than asked", reason="ATTESTATION_WRONG_MODEL"
            )
        self._verified[model] = self._verified[verified.model] = verified
        return verified

    def forget(self, model: str) -> None:
        self._verified.pop(model, None)

    async def seal(self, plain: pb.GenerateRequest, tenant: str) -> tuple[pb.GenerateRequest, Opener]:
        """The request to send for `plain` (its request id set): its prompt sealed to the attested
        worker, for the model that worker serves; and the opener of the answer."""
        verified = self._verified.get(plain.model) or await self.attest(plain.model, tenant)
        request_id, model = plain.request_id, verified.model
        key = os.urandom(32)
        request = pb.GenerateRequest(request_id=request_id, model=model, params=plain.params)
        request.sealed_messages.CopyFrom(
            seal_prompt(plain.messages, request_key(tenant, E2E_KEY_ID, request_id, model), key)
        )
        info = e2e_info(tenant, request_id, model)
        request.end_to_end.sealed_key = hpke_seal(verified.hpke_suite, verified.hpke_public_key, key, info)
        request.end_to_end.worker_id = verified.worker_id
        return request, Opener(key, response_key(tenant, E2E_KEY_ID, request_id, model))
