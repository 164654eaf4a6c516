"""The configuration file's reader: located errors and the typed getters every section uses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "Parser"]

T = TypeVar("T")


class ConfigError(Exception):
    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source, self.key, self.reason = source, key, reason


class Parser:
    """Reads tables and values of one file; every failure names the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def table(self, raw: dict[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = raw.get(key.rsplit(".", 1)[-1], {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        for unknown in sorted(set(value) - allowed):
            raise self.fail(f"{key}.{unknown}", "unknown key")
        return value

    def get(self, table: dict[str, Any], key: str, kind: type[T], default: T) -> T:
        name = key.rsplit(".", 1)[-1]
        if name not in table:
            return default
        value = table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {kind.__name__}, got {type(value).__name__}")
        return value

    def positive(self, table: dict[str, Any], key: str, default: int) -> int:
        value = self.get(table, key, int, default)
        if value <= 0:
            raise self.fail(key, f"must be a positive integer, got {value}")
        return value

    def address(self, table: dict[str, Any], key: str, default: str, *, optional: bool) -> str:
        value = self.get(table, key, str, default)
        if optional and value == "":
            return value
        port = re.fullmatch(r".+:(\d{1,5})", value)
        if not port or int(port.group(1)) > 65535:
            blank = ' (or "" to disable)' if optional else ""
            raise self.fail(key, f"must be HOST:PORT with a port up to 65535{blank}, got {value!r}")
        return value

    def path(self, table: dict[str, Any], key: str) -> Path | None:
        """An optional file path ("" or absent: None), with `~` expanded."""
        value = self.get(table, key, str, "")
        return Path(value).expanduser().absolute() if value else None
