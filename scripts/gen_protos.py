"""Generate the Python gRPC code for protos/ into a directory (default: the repository root).

`make protos` runs it in place; tests run it into a temporary directory and compare, so committed
stubs can never silently drift from the .proto sources.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
# google/rpc/status.proto (the worker channel's error frames) ships with googleapis-common-protos
GOOGLEAPIS = Path(status_pb2.__file__).resolve().parents[2]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto file; return the generated files (relative to out_dir)."""
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"-I{GOOGLEAPIS}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in (out_dir / "airlock").rglob("*_pb2*.py*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)
