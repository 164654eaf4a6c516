"""The run file of a stack, `STATE_DIR/run/stack.json`: how every `airlock` command finds the stack.

`airlock up` writes it once the stack serves and again on every change (a worker restarted, a tenant
added or removed), atomically, and removes it on a clean stop. It holds what the launcher knows:
its pid, the gateway's addresses and admin socket, and each worker's tenant, model, domain, pid,
start time and restarts. A run file whose launcher is gone is stale: commands say so and ignore it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_FILE",
    "NoRunningStackError",
    "Running",
    "find_running",
    "is_launcher",
    "process_alive",
    "write_atomic",
]

RUN_FILE = "stack.json"


class NoRunningStackError(Exception):
    """No stack runs from this state directory; the message says what to do."""


@dataclass(frozen=True)
class Running:
    """A stack whose launcher is alive, as its run file describes it."""

    path: Path
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def admin_socket(self) -> Path | None:
        socket = self.info.get("admin_socket")
        return Path(socket) if socket else None

    @property
    def tenants(self) -> list[str]:
        return [str(t) for t in self.info.get("tenants", [])]


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, though not ours to signal
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def is_launcher(pid: int) -> bool:
    """Whether `pid` is an `airlock up` (before a signal goes to a pid a stale file names)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the run file
    return b"up" in argv and any(b"airlock" in a or b"control.cli" in a for a in argv)


def read(state_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    path = state_dir / "run" / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return path, None
    return path, info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def find_running(state_dir: Path) -> Running:
    """The stack running from `state_dir`, or `NoRunningStackError` saying how to start one."""
    path, info = read(state_dir)
    if info is None:
        raise NoRunningStackError(
            f"no running stack in {state_dir}; start `airlock up` (or pass --state-dir of the one you "
            "started, or --address)"
        )
    if not process_alive(info["pid"]):
        raise NoRunningStackError(
            f"no running stack in {state_dir} (its run file {path} is stale: launcher pid {info['pid']} is "
            "gone); start `airlock up`, or pass --address"
        )
    return Running(path, info)


def write_atomic(path: Path, info: dict[str, Any]) -> None:
    """Replace `path` in one step (readers see the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
