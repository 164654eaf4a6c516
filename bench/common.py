"""What every benchmark shares: its rows against targets, and one JSON shape that bench/report.py reads.

A row is one line of the table in docs/benchmarks.md: what was measured, the baseline measured in
the same run, the figure, the target as a bound on that figure, and whether the bound was met, all
computed by the benchmark itself from numbers of that one run (so a JSON file is never judged by
numbers from another). The shape is checked by tests/bench/test_bench_smoke.py.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Where a --quick (smoke) run's JSON goes instead of the committed results: `make bench
# BENCH_FLAGS=--quick` then leaves bench/results and docs/benchmarks.md as they are.
QUICK_RESULTS = Path(tempfile.gettempdir()) / "airlock-bench-quick"
ROW_KEYS = ("id", "what", "baseline", "measured", "unit", "ratio", "target", "limit", "op", "met")


@dataclass(frozen=True)
class Row:
    id: str  # table order: "1a", "1b", "2", ...
    what: str
    baseline: str  # the same run's baseline figure(s), as text; "—" when the target is absolute
    measured: float
    unit: str
    ratio: float | None  # measured / baseline, when there is one
    target: str  # the target, in words
    limit: float  # the bound on `measured` that target comes to in this run
    op: str  # "<=" or ">="

    @property
    def met(self) -> bool:
        return self.measured <= self.limit if self.op == "<=" else self.measured >= self.limit

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile by rank (no interpolation), as the other benchmarks here compute it."""
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q / 100))]


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(samples),
        "p99": percentile(samples, 99),
        "mean": statistics.fmean(samples),
        "max": max(samples),
        "n": len(samples),
    }


def commit() -> str:
    """The commit measured, with "+dirty" when the work tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0],
    }


def write_report(out: Path, benchmark: str, rows: list[Row], results: dict[str, Any], *, quick: bool) -> None:
    """Write one benchmark's JSON: its rows (with targets met or not) and its detailed results."""
    report = {
        "benchmark": benchmark,
        "quick": quick,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": machine(),
        "rows": [row.as_json() for row in rows],
        "results": results,
    }
    if quick and out.parent.resolve() == RESULTS.resolve():
        out = QUICK_RESULTS / out.name  # a smoke run never replaces a measurement
        print(f"quick run: {out} (bench/results keeps the measured runs)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def print_rows(rows: list[Row]) -> None:
    for row in rows:
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "—"
        print(
            f"[{row.id}] {row.what}: {row.measured:.4g} {row.unit} (baseline {row.baseline}; ratio {ratio}); "
            f"target {row.target} -> {'met' if row.met else 'NOT met'}"
        )
