"""Structured JSON logging for Airlock's server processes.

Log records carry ids, sizes and counts only: callers of `logging` never pass a prompt, completion,
token or key, and the formatter emits only the fields it knows.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

__all__ = ["bind_request_id", "configure", "current_request_id"]

# The id of the call being served; every log line written while serving it carries it.
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("airlock_request_id", default="")


def bind_request_id(request_id: str) -> None:
    """Tie everything logged (and audited) from here on in this task to `request_id`."""
    _request_id.set(request_id)


def current_request_id() -> str:
    """The request id of the call being served, or "" outside a call."""
    return _request_id.get()


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
    "gateway_process",  # which of a gateway's processes (gateway/group.py)
    "returncode",
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
        if "request_id" not in entry and (request_id := _request_id.get()):
            entry["request_id"] = request_id
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
