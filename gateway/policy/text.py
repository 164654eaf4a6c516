"""The text grammar of policy files: what a reviewer sees is what the gateway and Casbin read.

Every file of a policy directory is UTF-8 without a byte order mark; a line ends at `\\n` (an `\\r`
just before it is dropped) and nowhere else; the only other whitespace is the space and the tab, and
no control, format (bidi, zero-width) or separator character may appear anywhere, comments included:
each could start a line for one reader and not for another, or hide text from a human.

`policy.csv` adds a grammar of its own, chosen so that pycasbin's file adapter reads exactly the
lines we read (it splits at `\\n`, strips, skips lines starting with `#`, splits at commas outside
`()`/`[]`, and knows no quotes; Go's reads quotes as CSV): a blank line, a comment (`#` first after
any indentation), or comma-separated fields, each stripped of spaces and tabs, none empty, none
holding `"` , `(`, `)`, `[` or `]`. A `#` inside a field is part of the value, as Casbin reads it
(`airlock policy lint` warns: a reader takes it for a comment).
"""

from __future__ import annotations

import io
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "MAX_LINE_CHARS", "PolicyError", "csv_lines", "read_policy_file", "show"]

MAX_FILE_BYTES = 64 * 1024 * 1024  # ~10x a 100k-line policy.csv
MAX_LINE_CHARS = 4096  # a policy.csv line: room for a long SPIFFE ID, never a megabyte field
_SHOWN = 80  # characters of a value quoted in an error message
_SLICE = 64 * 1024  # characters scanned at a time (see _unusual)

# Anything outside printable ASCII, tab and LF is looked at one by one (policy files are mostly ASCII).
_UNUSUAL = re.compile(r"[^\x20-\x7e\t\n]")
_REFUSED_CATEGORIES = {
    "Cc": "control character",
    "Cf": "invisible formatting character",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Zs": "space other than ' '",
    "Cs": "surrogate",
    "Co": "private-use character",
    "Cn": "unassigned character",
}
_CONTROL_NAMES = {"\x00": "NULL", "\x08": "BACKSPACE", "\x0b": "LINE TABULATION", "\x0c": "FORM FEED",
                  "\x1b": "ESCAPE", "\x1c": "FILE SEPARATOR", "\x1d": "GROUP SEPARATOR",
                  "\x1e": "RECORD SEPARATOR", "\x1f": "UNIT SEPARATOR", "\x7f": "DELETE",
                  "\x85": "NEXT LINE"}  # fmt: skip
_FIELD_REFUSED = {
    '"': "quotes are not part of the grammar (Casbin's readers disagree on them); write the value bare",
    "(": "parentheses are not allowed (Casbin's file reader groups fields inside them)",
    ")": "parentheses are not allowed (Casbin's file reader groups fields inside them)",
    "[": "brackets are not allowed (Casbin's file reader groups fields inside them)",
    "]": "brackets are not allowed (Casbin's file reader groups fields inside them)",
}


class PolicyError(Exception):
    """A policy directory that must not serve; the message names the file, line and reason."""


def show(value: object) -> str:
    """A value quoted for an error message, cut short: a policy file can't flood a log or audit."""
    if isinstance(value, str) and len(value) > _SHOWN:
        return f"{value[:_SHOWN]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= _SHOWN + 2 else f"{text[:_SHOWN]}... ({len(text)} characters)"


def read_policy_file(path: Path) -> str:
    """A policy file's text, once it is known to be a regular file of bounded size, UTF-8, and free
    of anything that reads differently to a person and to a parser (see the module docstring)."""
    try:
        # O_NONBLOCK: a fifo put in place of a file must not hang the reload (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PolicyError(f"{path}: missing") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise PolicyError(
                f"{path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} a policy file may hold"
            )
        try:
            data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError(f"{path}: more than the {MAX_FILE_BYTES} bytes a policy file may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicyError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); cannot read") from None
    check_text(path, text)
    return text


def check_text(path: Path, text: str) -> None:
    """Refuse a byte order mark, a line end other than LF or CRLF, and every control, format or
    separator character (the tab excepted), naming the physical line and column."""
    if text.startswith("\ufeff"):
        raise PolicyError(
            f"{path}:1: starts with a byte order mark (U+FEFF); save the file as UTF-8 without one"
        )
    for match in _unusual(text):
        char, at = match.group(), match.start()
        if char == "\r" and text.startswith("\n", at + 1):
            continue  # CRLF
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES:
            if char == "\r":
                why = "carriage return not followed by a newline (lines end with LF or CRLF only)"
            else:
                name = unicodedata.name(char, "") or _CONTROL_NAMES.get(char, "")
                named = f" ({name})" if name else ""
                why = f"{_REFUSED_CATEGORIES[category]} U+{ord(char):04X}{named} is not allowed"
            line = text.count("\n", 0, at) + 1
            column = at - (text.rfind("\n", 0, at) + 1) + 1
            raise PolicyError(f"{path}:{line}: column {column}: {why}")


def _unusual(text: str) -> Iterator[re.Match[str]]:
    """`_UNUSUAL`'s matches, looked for a slice at a time: one scan of a 4 MB policy.csv holds the
    GIL for ~13 ms, and the gateway reloads in a thread beside its event loop (gateway.policy.authz).
    (The pattern matches single characters, so no match straddles two slices.)"""
    for start in range(0, len(text), _SLICE):
        yield from _UNUSUAL.finditer(text, start, start + _SLICE)


def csv_lines(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """The data lines of policy.csv (already through `check_text`) as (physical line number, fields);
    blank lines and comments are skipped, anything outside the grammar is refused. Lines are read
    one at a time, not split at once, for the same reason as `_unusual`."""
    for number, raw in enumerate(io.StringIO(text, newline="\n"), start=1):
        raw = raw.removesuffix("\n")
        line = raw[:-1] if raw.endswith("\r") else raw
        if len(line) > MAX_LINE_CHARS:
            raise PolicyError(
                f"{path}:{number}: {len(line)} characters, longer than the {MAX_LINE_CHARS} a line may hold"
            )
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f.strip(" \t") for f in stripped.split(",")]
        for field in fields:
            bad = next((c for c in field if c in _FIELD_REFUSED), None)
            if bad is not None:
                raise PolicyError(f"{path}:{number}: {show(field)}: {_FIELD_REFUSED[bad]}")
        if not all(fields):
            raise PolicyError(f"{path}:{number}: empty field")
        yield number, fields
