"""Prometheus metrics of one gateway process, on a registry of its own (passed explicitly).

Labels are bounded: tenants come from the configuration, reasons and decisions from fixed sets;
never a subject, a token or anything else a caller chooses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.auth_failures = Counter(
            "airlock_auth_failures", "Calls refused by authentication, by reason", ["reason"], registry=r
        )
        self.authz_decisions = Counter(
            "airlock_authz_decisions", "Authorization decisions, by tenant and decision",
            ["tenant", "decision"], registry=r,
        )  # fmt: skip
        self.lockouts = Counter(
            "airlock_lockouts", "Identities or peers locked out, by kind", ["kind"], registry=r
        )
        self.policy_generation = Gauge(
            "airlock_policy_generation", "Generation of the policy in service", registry=r
        )
        self.policy_reloads = Counter(
            "airlock_policy_reloads", "Policy reloads, by result (accepted, rejected)", ["result"], registry=r
        )
        self.jwks_reloads = Counter(
            "airlock_jwks_reloads", "JWKS reloads, by result (accepted, rejected)", ["result"], registry=r
        )

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on (host, port); return the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
