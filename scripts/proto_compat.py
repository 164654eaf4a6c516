"""Check the .proto sources against the last release, the way `buf breaking` does, and check that
every message, field, enum value, service and method is documented.

    python scripts/proto_compat.py                    # check against the newest snapshot
    python scripts/proto_compat.py --snapshot 0.2.0   # record a release (protos/releases/0.2.0.json)

A release snapshot is the FileDescriptorSet of `protos/` as JSON. Breaking: removing or renaming a
message, field, enum value, service or method; changing a field's number, type or cardinality;
reusing a removed field's number or name without `reserved`; changing a method's types or streaming.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2, json_format
from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
RELEASES = PROTO_DIR / "releases"
GOOGLEAPIS = Path(status_pb2.__file__).resolve().parents[2]  # google/rpc/status.proto

FileSet = descriptor_pb2.FileDescriptorSet
Field = descriptor_pb2.FieldDescriptorProto


def current() -> FileSet:
    """The descriptor set of protos/ now, with comments (source info)."""
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        include = str(resources.files("grpc_tools") / "_proto")
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"-I{GOOGLEAPIS}", "--include_source_info",
                f"--descriptor_set_out={out}", *protos]  # fmt: skip
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return FileSet.FromString(out.read_bytes())


def latest_release() -> tuple[str, FileSet]:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in path.stem.split("."))

    newest = max(RELEASES.glob("*.json"), key=version)
    return newest.stem, json_format.Parse(newest.read_text(), FileSet())


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[int, Field]:
    return {f.number: f for f in message.field}


def _shape(field: Field) -> tuple[int, str, int, bool]:
    return field.type, field.type_name, field.label, field.proto3_optional


def _messages(fs: FileSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, messages: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            out[f"{prefix}.{m.name}"] = m
            walk(f"{prefix}.{m.name}", list(m.nested_type))

    for f in fs.file:
        walk(f.package, list(f.message_type))
    return out


def _signature(method: descriptor_pb2.MethodDescriptorProto) -> tuple[str, str, bool, bool]:
    return method.input_type, method.output_type, method.client_streaming, method.server_streaming


def breaking(old: FileSet, new: FileSet) -> list[str]:
    """What in `new` breaks a client or server built against `old`."""
    problems: list[str] = []
    new_messages = _messages(new)
    for name, before in _messages(old).items():
        after = new_messages.get(name)
        if after is None:
            problems.append(f"message {name} was removed")
            continue
        now = _fields(after)
        reserved = {n for r in after.reserved_range for n in range(r.start, r.end)}
        for number, field in _fields(before).items():
            if number not in now:
                if number not in reserved or field.name not in after.reserved_name:
                    problems.append(f"{name}.{field.name} (#{number}) was removed without reserving it")
            elif now[number].name != field.name:
                problems.append(f"{name} field #{number} was renamed {field.name} -> {now[number].name}")
            elif _shape(now[number]) != _shape(field):
                problems.append(f"{name}.{field.name} changed type or cardinality")
    new_enums = {f"{f.package}.{e.name}": e for f in new.file for e in f.enum_type}
    for f in old.file:
        for enum in f.enum_type:
            name = f"{f.package}.{enum.name}"
            values = {v.number: v.name for v in new_enums[name].value} if name in new_enums else None
            if values is None:
                problems.append(f"enum {name} was removed")
                continue
            problems += [f"enum value {name}.{v.name} was removed or renamed"
                         for v in enum.value if values.get(v.number) != v.name]  # fmt: skip
    new_methods = {(f.package, s.name, m.name): m for f in new.file for s in f.service for m in s.method}
    for f in old.file:
        for service in f.service:
            for method in service.method:
                after_m = new_methods.get((f.package, service.name, method.name))
                where = f"{f.package}.{service.name}/{method.name}"
                if after_m is None:
                    problems.append(f"method {where} was removed")
                elif _signature(after_m) != _signature(method):
                    problems.append(f"method {where} changed its types or streaming")
    return problems


def undocumented(fs: FileSet) -> list[str]:
    """Every message, field, enum, enum value, service and method needs a leading comment."""
    missing: list[str] = []
    for f in fs.file:
        documented = {tuple(loc.path) for loc in f.source_code_info.location if loc.leading_comments.strip()}

        def need(path: tuple[int, ...], what: str, f: descriptor_pb2.FileDescriptorProto = f,
                 documented: set[tuple[int, ...]] = documented) -> None:  # fmt: skip
            if path not in documented:
                missing.append(f"{f.name}: {what}")

        for i, m in enumerate(f.message_type):  # 4: message_type, 2: field
            need((4, i), f"message {m.name}")
            for j, field in enumerate(m.field):
                need((4, i, 2, j), f"field {m.name}.{field.name}")
        for i, e in enumerate(f.enum_type):  # 5: enum_type, 2: value
            need((5, i), f"enum {e.name}")
            for j, value in enumerate(e.value):
                need((5, i, 2, j), f"enum value {value.name}")
        for i, s in enumerate(f.service):  # 6: service, 2: method
            need((6, i), f"service {s.name}")
            for j, method in enumerate(s.method):
                need((6, i, 2, j), f"method {s.name}.{method.name}")
    return missing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshot", metavar="VERSION", help="record protos/ as release VERSION")
    args = p.parse_args()
    now = current()
    if args.snapshot:
        for f in now.file:
            f.ClearField("source_code_info")  # comments may change freely between releases
        RELEASES.mkdir(exist_ok=True)
        path = RELEASES / f"{args.snapshot}.json"
        path.write_text(json_format.MessageToJson(now, indent=1) + "\n")
        print(f"recorded {path.relative_to(ROOT)}")
        return 0
    version, release = latest_release()
    problems = [f"breaking change against {version}: {p}" for p in breaking(release, now)]
    problems += [f"undocumented {m}" for m in undocumented(now)]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"protos: {len(problems)} problem(s) against release {version}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
