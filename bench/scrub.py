"""Scrub throughput: the domain scrubber (overwrite + verify) vs a plain zeroing of the same memory.

CPU: `scrub_arena` over a /dev/shm arena (canary scan, overwrite, verify every byte) against a bare
overwrite of the same mapping. CUDA (when present): `scrub_cuda` against `torch.zeros` of the same
size. Same run, same sizes; the goal (row 9 of docs/benchmarks.md) is a scrub at >= 50% of the
plain zeroing's GB/s. Prints a table and writes bench/results/scrub.json.

    python bench/scrub.py [--quick] [--mb 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from common import RESULTS, Row, print_rows, write_report  # noqa: E402

from worker.isolation.arena import Arena  # noqa: E402
from worker.isolation.scrub import scrub_arena, scrub_cuda  # noqa: E402


def _dirty(path: Path, size: int) -> None:
    """Fill the arena with a non-zero pattern: both contenders then find the same used memory."""
    fd = os.open(path, os.O_RDWR)
    try:
        mem = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    with mem:
        view = np.frombuffer(mem, dtype=np.uint8)
        view.fill(0xA5)
        del view


def plain_zero(path: Path, size: int) -> float:
    fd = os.open(path, os.O_RDWR)
    try:
        mem = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    with mem:
        view = np.frombuffer(mem, dtype=np.uint8)
        start = time.perf_counter()
        view.fill(0)  # a plain memset of the same mapping
        elapsed = time.perf_counter() - start
        del view
    return elapsed


def cpu_row(size: int, runs: int) -> dict[str, float]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = base / f"airlock-bench-{os.getpid()}.arena"
    scrub_s, zero_s = [], []
    try:
        for _ in range(runs):
            arena = Arena(path, size)
            arena.close()
            _dirty(path, size)
            arena = Arena(path, size)
            record = arena.write_canaries(path.with_suffix(".json"))
            arena.close()
            start = time.perf_counter()
            result = scrub_arena(path, record)  # canary check, overwrite, verify: end to end
            scrub_s.append(time.perf_counter() - start)
            if not result.verified:
                raise SystemExit(f"scrub did not verify: {result.reason}")
            _dirty(path, size)
            zero_s.append(plain_zero(path, size))
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
    return {"scrub_gbps": size / statistics.median(scrub_s) / 1e9,
            "zero_gbps": size / statistics.median(zero_s) / 1e9}  # fmt: skip


def cuda_row(runs: int) -> dict[str, float] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    scrub, zero = [], []
    for _ in range(runs):
        start = time.perf_counter()
        result = scrub_cuda(None)
        scrub.append(result.bytes / (time.perf_counter() - start) / 1e9)
        block = torch.empty(result.bytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        block.zero_()  # the plain zero_ of the same size
        torch.cuda.synchronize()
        zero.append(result.bytes / (time.perf_counter() - start) / 1e9)
        del block
        torch.cuda.empty_cache()
    return {"scrub_gbps": statistics.median(scrub), "zero_gbps": statistics.median(zero)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 32 MiB arena, one run (smoke test)")
    parser.add_argument("--mb", type=int, default=512, help="CPU arena size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "scrub.json")
    a = parser.parse_args()
    if a.quick:
        a.mb, a.runs = 32, 1
    rows = {"cpu": cpu_row(a.mb << 20, a.runs)}
    cuda = cuda_row(a.runs)
    if cuda is not None:
        rows["cuda"] = cuda
    print(f"{'domain':<6} {'scrub GB/s':>11} {'plain zero GB/s':>16} {'ratio':>7}  (goal >= 50%)")
    for name, row in rows.items():
        row["ratio"] = row["scrub_gbps"] / row["zero_gbps"]
        print(f"{name:<6} {row['scrub_gbps']:>11.2f} {row['zero_gbps']:>16.2f} {row['ratio']:>6.0%}")
    if cuda is None:
        print("cuda: skipped (no CUDA device)")
    what = {"cpu": f"CPU arena {a.mb} MiB (/dev/shm)", "cuda": "CUDA device free memory"}
    table = [
        Row("9" if name == "cpu" else "9-cuda", f"scrub (canary check, overwrite, verify), {what[name]}",
            f"plain {'memset' if name == 'cpu' else 'zero_()'} {row['zero_gbps']:.2f} GB/s",
            row["scrub_gbps"], "GB/s", row["ratio"], "≥ 50% of the plain zeroing", 0.5 * row["zero_gbps"],
            ">=")
        for name, row in rows.items()
    ]  # fmt: skip
    print_rows(table)
    write_report(a.out, "scrub", table, {"cpu_mb": a.mb, "runs": a.runs, **rows}, quick=a.quick)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
