"""Prometheus metrics of one gateway process, on a registry of its own (passed explicitly).

Labels are bounded: tenants come from the configuration, reasons and decisions from fixed sets;
never a subject, a token or anything else a caller chooses. A gateway of several processes
(`gateway.processes`, gateway/group.py) has one registry and one metrics port per process, each with
`airlock_gateway_process{index,count}`; Prometheus sums them across its scrape targets.

A call's series are looked up once per tenant label (`Metrics.tenant`), not once per call and
metric: `labels()` takes a lock and hashes the label tuple every time, and a call touches ~8 series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "TenantSeries"]


class _Children(dict[Any, Any]):
    """One metric's children for one tenant, by their other labels, each looked up once."""

    def __init__(self, metric: Any, tenant: str) -> None:
        super().__init__()
        self.metric, self.tenant = metric, tenant

    def __missing__(self, key: Any) -> Any:
        labels = key if isinstance(key, tuple) else (key,)
        child = self[key] = self.metric.labels(self.tenant, *labels)
        return child


class TenantSeries:
    """The series of one tenant label (a tenant of the policy, or "other"), bound once: each of
    its dictionaries is keyed by a metric's remaining labels (fixed sets: methods, status code
    names, decisions, reasons, token kinds)."""

    def __init__(self, metrics: Metrics, tenant: str) -> None:
        self.requests = _Children(metrics.requests, tenant)  # (method, code)
        self.seconds = _Children(metrics.request_seconds, tenant)  # method
        self.tokens = _Children(metrics.tokens, tenant)  # "prompt" | "completion"
        self.quota_rejections = _Children(metrics.quota_rejections, tenant)  # reason
        self.authz = _Children(metrics.authz_decisions, tenant)  # "allow" | "deny"
        self.streams = metrics.concurrent_streams.labels(tenant)


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
        self.process = Gauge(
            "airlock_gateway_process", "1, labelled with this process's index and the gateway's count",
            ["index", "count"], registry=r,
        )  # fmt: skip
        self.process_restarts = Counter(
            "airlock_gateway_process_restarts", "Gateway processes that exited and were started again "
            "(counted by process 0)", registry=r,
        )  # fmt: skip

        self._tenants: dict[str, TenantSeries] = {}

    def tenant(self, label: str) -> TenantSeries:
        """The series of a tenant label; `label` must already be bounded (a policy tenant or "other")."""
        series = self._tenants.get(label)
        if series is None:
            series = self._tenants[label] = TenantSeries(self, label)
        return series

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on (host, port); return the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
