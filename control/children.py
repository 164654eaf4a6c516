"""A child process the launcher started: its process, log, ready file and what it reported."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Child"]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_file: Path
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    since: float = field(default_factory=time.time)  # wall clock, for the run file

    @property
    def port(self) -> int:
        return int(self.info["port"])

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
