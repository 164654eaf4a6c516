"""`make fuzz`: run every atheris target (or those named) for FUZZ_SECONDS each (default 60).

The corpus of each target grows in fuzz/corpus/NAME (seeded from the harness, kept between runs,
not committed); crashing inputs land in fuzz/crashes/. Fails when any target crashed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.harness import TARGETS, seeds  # noqa: E402  (after the path set-up above)


def main(argv: list[str]) -> int:
    seconds = int(os.environ.get("FUZZ_SECONDS", "60"))
    names = argv or list(TARGETS)
    failed = []
    (HERE / "crashes").mkdir(exist_ok=True)
    for name in names:
        corpus = HERE / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds(name)):
            (corpus / f"seed-{i}").write_bytes(data)
        print(f"fuzz: {name} for {seconds} s (corpus {corpus})", flush=True)
        code = subprocess.call(
            [sys.executable, str(HERE / "atheris_target.py"), name, f"-max_total_time={seconds}",
             "-timeout=10", "-rss_limit_mb=4096", f"-artifact_prefix={HERE / 'crashes'}/{name}-",
             "-print_final_stats=1", str(corpus)],
            cwd=HERE.parent,
        )  # fmt: skip
        if code != 0:
            failed.append(name)
    if failed:
        print(f"fuzz: FAILED: {', '.join(failed)} (inputs in {HERE / 'crashes'})", file=sys.stderr)
        return 1
    print(f"fuzz: {', '.join(names)}: no finding in {seconds} s each")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
