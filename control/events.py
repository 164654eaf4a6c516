"""The gateway's significant events as one human line each, read from its audit trail as it grows.

The foreground `airlock up` prints them: a policy reload (rejected: why, with file and line), a JWKS
reload, a lockout, a route change. The audit trail is the gateway's record of exactly these, so the
launcher follows it instead of parsing log text: `AuditFollower.lines()` returns what was appended
since it last looked (a rotation starts it on the new file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["AuditFollower", "describe"]

MAX_READ = 1 << 20  # at most this much of a growing trail per look


class AuditFollower:
    """Follows one audit file from where it ends now."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode, self._offset = self._where()

    def _where(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return 0, 0
        return st.st_ino, st.st_size

    def lines(self) -> list[str]:
        """One human line per significant record appended since the last call."""
        inode, size = self._where()
        if inode != self._inode or size < self._offset:  # rotated or replaced: the new file's start
            self._inode, self._offset = inode, 0
        if size <= self._offset:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read(min(size - self._offset, MAX_READ))
        except OSError:
            return []
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self._offset += len(whole)
        out = []
        for raw in whole.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            line = describe(record) if isinstance(record, dict) else None
            if line is not None:
                out.append(line)
        return out


def describe(record: dict[str, Any]) -> str | None:
    """The operator's line for one audit record; None for the records of ordinary calls."""
    event = record.get("event")
    if event == "policy_reload":
        generation = record.get("generation")
        if record.get("result") == "rejected":
            return f"policy reload REJECTED; generation {generation} keeps serving: {record.get('reason')}"
        warnings = record.get("lint_warnings")
        lint = f", {warnings} lint warning(s): `airlock policy lint`" if warnings else ""
        return (
            f"policy generation {generation} in service ({record.get('rules')} rules, "
            f"{record.get('links')} role links{lint})"
        )
    if event == "jwks_reload":
        return f"JWKS reload {record.get('result')}: {record.get('file')}"
    if event == "lockout":
        who = record.get("subject") or record.get("peer") or record.get("key")
        seconds = float(record.get("seconds") or 0)
        return (
            f"lockout: {record.get('kind')} failures locked {who} out for {seconds:.0f} s "
            "(`airlock lockout list|clear`)"
        )
    if event == "lockout_cleared":
        return (
            f"lockouts cleared: {record.get('target')} {record.get('value') or ''} ({record.get('cleared')})"
        )
    if event == "routes_set":
        added, removed = record.get("added") or [], record.get("removed") or []
        return f"gateway routes: +{', +'.join(added) or 'none'}; -{', -'.join(removed) or 'none'}"
    return None
