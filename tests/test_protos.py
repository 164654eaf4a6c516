"""The committed gRPC code in airlock/v1 must be exactly what `make protos` generates now; the
.proto sources stay compatible with the last release and documented (scripts/proto_compat.py)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    generated = _generator().generate(tmp_path)
    assert generated, "protoc produced nothing"
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "airlock" / "v1").glob("*_pb2*.py*"))
    assert committed == generated, "generated file set differs: run `make protos`"
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), (
            f"{rel} is stale: run `make protos`"
        )


def _compat() -> Any:
    spec = importlib.util.spec_from_file_location("proto_compat", ROOT / "scripts" / "proto_compat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPAT = _compat()


def test_the_protos_are_compatible_with_the_last_release_and_documented() -> None:
    version, release = COMPAT.latest_release()
    now = COMPAT.current()
    assert COMPAT.breaking(release, now) == [], f"breaking change against release {version}"
    assert COMPAT.undocumented(now) == []


def _message(fs: Any, name: str) -> Any:
    return next(m for f in fs.file for m in f.message_type if m.name == name)


def _mutated(change: Callable[[Any], None]) -> Any:
    fs = COMPAT.current()
    change(fs)
    return fs


def _drop_field(fs: Any) -> None:
    del _message(fs, "GenerateRequest").field[1]  # model = 2


def _drop_field_reserved(fs: Any) -> None:
    message = _message(fs, "GenerateRequest")
    del message.field[1]
    message.reserved_range.add(start=2, end=3)
    message.reserved_name.append("model")


def _renumber(fs: Any) -> None:
    _message(fs, "Usage").field[0].number = 9


def _retype(fs: Any) -> None:
    _message(fs, "Usage").field[0].type = descriptor_pb2.FieldDescriptorProto.TYPE_INT64


def _make_repeated(fs: Any) -> None:
    _message(fs, "GenerateRequest").field[0].label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


def _unstream(fs: Any) -> None:
    for f in fs.file:
        for s in f.service:
            for m in s.method:
                if m.name == "GenerateStream" and s.name == "Inference":
                    m.server_streaming = False


def _drop_method(fs: Any) -> None:
    for f in fs.file:
        for s in f.service:
            if s.name == "Inference":
                del s.method[2]  # ListModels


def _drop_enum_value(fs: Any) -> None:
    next(e for f in fs.file for e in f.enum_type if e.name == "FinishReason").value.pop()


def _add_field(fs: Any) -> None:
    _message(fs, "GenerateRequest").field.add(
        name="priority", number=10, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_drop_field, "GenerateRequest.model (#2) was removed without reserving it"),
        (_renumber, "Usage.prompt_tokens (#1) was removed"),  # #1 is gone, which is what a client sees
        (_retype, "Usage.prompt_tokens changed type or cardinality"),
        (_make_repeated, "GenerateRequest.request_id changed type or cardinality"),
        (_unstream, "Inference/GenerateStream changed its types or streaming"),
        (_drop_method, "Inference/ListModels was removed"),
        (_drop_enum_value, "FinishReason.FINISH_REASON_LENGTH was removed"),
    ],
)
def test_breaking_changes_are_caught(change: Callable[[Any], None], expected: str) -> None:
    problems = COMPAT.breaking(COMPAT.current(), _mutated(change))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("change", [_drop_field_reserved, _add_field])
def test_compatible_changes_pass(change: Callable[[Any], None]) -> None:
    assert COMPAT.breaking(COMPAT.current(), _mutated(change)) == []


def test_an_undocumented_field_is_caught() -> None:
    fs = COMPAT.current()
    inference = next(f for f in fs.file if f.name.endswith("inference.proto"))
    for loc in inference.source_code_info.location:
        if list(loc.path) == [4, 0, 2, 0]:  # the first message's first field
            loc.leading_comments = ""
    assert COMPAT.undocumented(fs) == ["airlock/v1/inference.proto: field ChatMessage.role"]
