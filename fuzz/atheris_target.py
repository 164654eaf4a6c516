"""One atheris target process: `python fuzz/atheris_target.py NAME [libFuzzer flags] [corpus dirs]`.

Our modules and PyJWT are instrumented for coverage; any exception the harness lets escape (a
`Finding` or anything unexpected) is a crash: libFuzzer saves the input and the process fails."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["airlock", "gateway", "jwt", "fuzz"]):
    from fuzz.harness import TARGETS


def main() -> None:
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
