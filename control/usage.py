"""Who used what, from the gateway's audit trail: requests, tokens and refusals per tenant.

The trail has one `request` record per generation call (its outcome, code and token counts), one
`authorization` record per decision (denials are refusals), `rate_limited` records counting calls
refused at the rate gate, and `authentication` records of calls refused before any tenant was known.
Rotated files (`gateway.jsonl.1`, …) are read too, oldest first. Counts are this gateway's trail;
with several replicas, add their trails up.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.audit import segments

__all__ = ["TenantUsage", "Usage", "parse_since", "usage"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class TenantUsage:
    tenant: str
    requests: int = 0  # generation calls that passed the guard
    ok: int = 0
    failed: int = 0  # of those, answered with an error (quota, worker, deadline, ...)
    quota_refused: int = 0  # of the failed, refused by a quota (RESOURCE_EXHAUSTED)
    denied: int = 0  # calls the policy denied (any method)
    rate_limited: int = 0  # calls refused at the rate gate (any method)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Usage:
    tenants: dict[str, TenantUsage]
    unauthenticated: int  # calls refused before any identity (and so any tenant) was known
    since: float | None
    files: list[Path]


def parse_since(text: str, now: float | None = None) -> float:
    """`30m`, `2h`, `7d`, `1w` ago, or an ISO time (`2025-06-01`, `2025-06-01T12:00`, local time
    unless it says otherwise): the unix time it means. ValueError for anything else."""
    now = time.time() if now is None else now
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"{text!r}: a duration (30m, 2h, 7d) or a time (2025-06-01T12:00)") from None


def _records(path: Path) -> Iterator[dict[str, Any]]:
    for segment in segments(path):
        try:
            with segment.open("rb") as fh:
                for raw in fh:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        yield record
        except OSError:
            continue


def usage(path: Path, *, tenant: str | None = None, since: float | None = None) -> Usage:
    tenants: dict[str, TenantUsage] = {}
    unauthenticated = 0

    def of(name: Any) -> TenantUsage | None:
        if not isinstance(name, str) or (tenant is not None and name != tenant):
            return None
        return tenants.setdefault(name, TenantUsage(name))

    for record in _records(path):
        ts = record.get("ts")
        if since is not None and (not isinstance(ts, int | float) or ts < since):
            continue
        event = record.get("event")
        if event == "request" and (row := of(record.get("tenant"))) is not None:
            row.requests += 1
            if record.get("outcome") == "ok":
                row.ok += 1
            else:
                row.failed += 1
                row.quota_refused += record.get("code") == "RESOURCE_EXHAUSTED"
            row.prompt_tokens += _int(record.get("prompt_tokens"))
            row.completion_tokens += _int(record.get("completion_tokens"))
        elif event == "authorization" and record.get("decision") == "deny":
            if (row := of(record.get("tenant"))) is not None:
                row.denied += 1
        elif event == "rate_limited" and (row := of(record.get("tenant"))) is not None:
            row.rate_limited += _int(record.get("refused"))
        elif event == "authentication" and record.get("decision") == "refused":
            unauthenticated += 1
    return Usage(dict(sorted(tenants.items())), unauthenticated, since, segments(path))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
