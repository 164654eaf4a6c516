"""Structured JSON logging for Airlock's server processes.

Log records carry ids, sizes and counts only: callers of `logging` never pass a prompt, completion,
token or key, and the formatter emits only the fields it knows.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure"]

_FIELDS = (
    "request_id",
    "tenant",
    "model",
    "subject",
    "component",
    "reason",
    "error_type",
    "code",
    "port",
    "pid",
    "elapsed_s",
    "tokens",
    "issuer",
    "keys",
    "mtls_port",
)


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(component: str, level: str = "info") -> None:
    """Send JSON lines to stderr; called once by each process's entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
