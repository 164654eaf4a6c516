"""How every `airlock` command talks to its operator: one prefixed line on stderr."""

from __future__ import annotations

import sys

__all__ = ["err"]


def err(message: str) -> None:
    print(f"airlock: {message}", file=sys.stderr, flush=True)
