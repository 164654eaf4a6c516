"""Why a connection to a gateway failed, in one sentence with what to do about it.

gRPC reports every connection failure as `UNAVAILABLE` with a C-core description ("failed to connect
to all addresses; last error: UNKNOWN: ipv4:…: Tls handshake failed (TSI_PROTOCOL_FAILURE): …").
The SDK turns the common mistakes into an `UnavailableError` whose message says what happened and
what to check, with a reason of its own; anything else keeps gRPC's description (reason UNAVAILABLE).
"""

from __future__ import annotations

from dataclasses import dataclass

from airlock.errors import UnavailableError

__all__ = ["Connection"]


@dataclass(frozen=True)
class Connection:
    """How a client connects: enough to explain a failure without repeating any secret."""

    target: str
    ca: str | None  # the CA file's path; "": given as bytes; None: the system's roots
    client_cert: bool  # a client certificate (mTLS) is presented

    def explain(self, details: str) -> UnavailableError | None:
        """The error for a connection failure gRPC described as `details`; None when it is not one
        of the mistakes known here."""
        text = details.lower()
        target = self.target
        if "connection refused" in text:
            return UnavailableError(
                f"nothing is listening on {target}: check the address and that the gateway runs there",
                reason="CONNECT_REFUSED",
            )
        if "errors resolving" in text or "dns resolution failed" in text or "name not found" in text:
            return UnavailableError(
                f"cannot resolve the host of {target}: check the address", reason="ADDRESS_UNRESOLVED"
            )
        if "wrong_version_number" in text or "wrong version number" in text or "http_request" in text:
            return UnavailableError(
                f"{target} does not speak TLS (a plaintext port, such as a metrics endpoint?): the "
                "gateway's port for token callers is gateway.listen",
                reason="TLS_NOT_SPOKEN",
            )
        if "certificate_verify_failed" in text:
            trusted = {None: "any CA this system trusts", "": "the CA given (ca_cert)"}.get(
                self.ca, f"the CA in {self.ca}"
            )
            return UnavailableError(
                f"the certificate of {target} is not signed by {trusted}: pass ca_cert, the CA that "
                "signed the gateway's certificate",
                reason="TLS_UNTRUSTED",
            )
        if "not in peer certificate" in text or "hostname mismatch" in text:
            return UnavailableError(
                f"the certificate of {target} does not name that host: connect by a name it was issued for",
                reason="TLS_NAME_MISMATCH",
            )
        handshake = "socket closed" in text or "certificate required" in text or "handshake" in text
        if handshake and not self.client_cert:
            return UnavailableError(
                f"{target} closed the connection during the TLS handshake: it wants a client certificate "
                "(the gateway's service (mTLS) port?); token callers use the TLS port, gateway.listen",
                reason="TLS_CLIENT_CERT_REQUIRED",
            )
        if handshake:
            return UnavailableError(
                f"{target} closed the connection during the TLS handshake: it did not accept this client "
                "certificate (not issued by its service CA?) or it is not the gateway's service port",
                reason="TLS_CLIENT_CERT_REFUSED",
            )
        return None
