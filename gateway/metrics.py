"""Prometheus metrics of one gateway process, on a registry of its own (passed explicitly).

Labels are bounded: tenants come from the configuration, reasons and decisions from fixed sets;
never a subject, a token or anything else a caller chooses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.watch_errors = Counter(
            "airlock_watch_errors", "Failures inside a file watcher, which then starts again, by watcher "
            "(policy, jwks, keystore)", ["watcher"], registry=r,
        )  # fmt: skip
        # Generation calls (gateway.admission): tenants of the policy only, everything else "other".
        self.requests = Counter(
            "airlock_requests", "Generation calls that passed the guard, by tenant, method and status code",
            ["tenant", "method", "code"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "airlock_request_duration_seconds", "Generation call latency (a whole stream), by tenant, method",
            ["tenant", "method"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        self.tokens = Counter(
            "airlock_tokens", "Tokens processed, by tenant and kind (prompt, completion)",
            ["tenant", "kind"], registry=r,
        )  # fmt: skip
        self.quota_rejections = Counter(
            "airlock_quota_rejections", "Calls refused by a tenant quota, by tenant and reason",
            ["tenant", "reason"], registry=r,
        )  # fmt: skip
        self.concurrent_streams = Gauge(
            "airlock_concurrent_streams", "Generation calls in flight (holding a quota slot), by tenant",
            ["tenant"], registry=r,
        )  # fmt: skip

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on (host, port); return the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
