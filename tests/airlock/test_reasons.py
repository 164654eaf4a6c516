"""The reasons registry (airlock/reasons.py) against the code and against docs/protocol.md.

(a) every reason raised anywhere in airlock/, serving/, gateway/ or worker/ is registered, with a
status code its error class can carry, and nothing is registered that nothing raises; (b) every
reason a caller can see is in the error table, in the row of its usual code; (c) the table lists
no reason that is not registered, nor one under a code it never comes with.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airlock import errors
from airlock.envelope import SealError
from airlock.reasons import REASONS, Audience

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("airlock", "serving", "gateway", "worker")
REASON = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
# The status code each error class answers with (None: not a status; a file refused at start-up).
ERROR_CLASSES = [
    cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.AirlockError)
]
CLASSES: dict[str, grpc.StatusCode | None] = {cls.__name__: cls.code for cls in ERROR_CLASSES} | {
    "SealError": SealError.code,
    "BundleError": None,
    "_refuse": errors.AttestationError.code,  # airlock/attestation.py's AttestationError helper
}  # fmt: skip


def _literal(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and REASON.fullmatch(node.value):
        return node.value
    return None


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def raised() -> Iterator[tuple[str, grpc.StatusCode | None, str]]:
    """(reason, the code of the class it is raised with, UNKNOWN where the scan can't tell; where)
    for every reason literal: `reason=` arguments, `default_reason`, reason constants
    (`RATE_LIMITED = "RATE_LIMITED"`), `_refuse(message, REASON)`, `getattr(err, "reason", REASON)`
    and `.reason == REASON` tests."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" not in path.relative_to(ROOT).parts:
                yield from _found(ast.parse(path.read_text()), str(path.relative_to(ROOT)))


def _found(tree: ast.AST, where: str) -> Iterator[tuple[str, grpc.StatusCode | None, str]]:
    unknown = grpc.StatusCode.UNKNOWN
    for node in ast.walk(tree):
        found: list[tuple[ast.AST | None, grpc.StatusCode | None]] = []
        if isinstance(node, ast.Call):
            name, cls = _name(node.func), CLASSES.get(_name(node.func), unknown)
            found += [(k.value, cls) for k in node.keywords if k.arg == "reason"]
            if name == "_refuse" and len(node.args) > 1:
                found.append((node.args[1], cls))
            if name == "getattr" and len(node.args) == 3:
                found.append((node.args[2], unknown))
        elif isinstance(node, ast.ClassDef):
            cls = CLASSES.get(node.name, unknown)
            for item in node.body:
                if isinstance(item, ast.Assign) and [_name(t) for t in item.targets] == ["default_reason"]:
                    found.append((item.value, cls))
        elif isinstance(node, ast.Assign) and [_name(t) for t in node.targets] == [_literal(node.value)]:
            found.append((node.value, unknown))  # a reason constant
        elif isinstance(node, ast.Compare) and _name(node.left) == "reason":
            found += [(right, unknown) for right in node.comparators]
        for value, code in found:
            if reason := _literal(value):
                yield reason, code, f"{where}:{getattr(value, 'lineno', 0)}"


RAISED = list(raised())


def test_the_scan_sees_the_raises_it_is_meant_to() -> None:
    seen = {reason for reason, _, _ in RAISED}
    # one of each kind: keyword, default_reason, constant, _refuse, getattr default, comparison
    assert {"TOKEN_EXPIRED", "SEAL_INVALID", "RATE_LIMITED", "ATTESTATION_UNTRUSTED", "KEYS_MISSING"} <= seen


def test_every_reason_raised_is_registered_with_a_code_its_class_carries() -> None:
    unregistered = sorted({f"{reason} ({where})" for reason, _, where in RAISED if reason not in REASONS})
    assert unregistered == [], "register these in airlock/reasons.py (and document them)"
    wrong = sorted(
        f"{reason} raised as {code.name if code else 'no status'} ({where})"
        for reason, code, where in RAISED
        if code is not grpc.StatusCode.UNKNOWN
        and not (code in REASONS[reason].codes if code is not None else REASONS[reason].codes == ())
    )
    assert wrong == [], "raise each reason with the error class of a code it is registered with"


def test_nothing_is_registered_that_nothing_raises() -> None:
    assert sorted(set(REASONS) - {reason for reason, _, _ in RAISED}) == []


def test_operator_reasons_are_never_a_status_and_every_other_has_one() -> None:
    for name, reason in REASONS.items():
        assert (reason.audience is Audience.OPERATOR) == (reason.codes == ()), name
        assert reason.meaning and "\n" not in reason.meaning, name


def error_table() -> dict[str, set[str]]:
    """docs/protocol.md's error table: status code -> the reasons its row lists."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## Errors") :].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        if match := re.match(r"\| `([A-Z_]+)` \|", line):
            reasons = line.rstrip(" |").rsplit("|", 1)[1]
            rows[match.group(1)] = set(re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", reasons))
    return rows


TABLE = error_table()


def test_every_reason_a_caller_can_see_is_in_the_row_of_its_code() -> None:
    assert len(TABLE) >= 10  # the table was found and read
    missing = defaultdict(list)
    for name, reason in REASONS.items():
        row = reason.codes[0].name if reason.codes else ""
        if reason.visible and name not in TABLE.get(row, set()):
            missing[row].append(name)
    assert dict(missing) == {}, "document these in docs/protocol.md's error table"


@pytest.mark.parametrize("code", sorted(TABLE))
def test_the_table_lists_only_registered_reasons_under_codes_they_come_with(code: str) -> None:
    for listed in TABLE[code]:
        names = [n for n in REASONS if n.startswith(listed[:-1])] if listed.endswith("*") else [listed]
        assert names and all(n in REASONS for n in names), f"{listed} is not registered"
        assert any(grpc.StatusCode[code] in REASONS[n].codes for n in names), (
            f"{listed} never comes as {code}"
        )
        if not listed.endswith("*"):
            assert REASONS[listed].visible, f"{listed} never reaches a caller: not in the table"
