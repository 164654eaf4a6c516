"""The gateway's audit trail: one JSON line per security decision (who, tenant, what, outcome).

Records never hold a token, a key, a prompt or a completion: only identifiers, decisions, reason
codes and sizes. (Hash chaining, signing and rotation are the operations issue's; this is the
record format and the single place every decision is written from.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]

_log = logging.getLogger("airlock.audit")


class AuditLog:
    """Appends records to `path` (mode 0600); with no path, records go to the `airlock.audit` logger."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()  # policy reloads write from a worker thread
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fh = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def record(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields}, separators=(",", ":"))
        if self._fh is None:
            _log.info(line)
            return
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
