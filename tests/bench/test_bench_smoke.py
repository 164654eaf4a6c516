"""Every benchmark runs in its --quick mode and writes the JSON shape bench/report.py reads, and the
report renders every row of the issue's table from it. Timing is never asserted here: a quick run
on a shared machine proves the benchmarks work, not how fast anything is (`make bench` measures)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.ceph import S3Site

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# Each benchmark and the table rows it must measure (scrub adds 9-cuda where there is a GPU).
ROWS = {
    "overhead": {"1a", "1b", "2", "3", "4"},
    "http_door": {"10a", "10b", "10c", "10d", "10e"},
    "capacity": {"12a", "12b"},
    "processes": {"13"},
    "model_tokens": {"5"},
    "authz": {"6a", "6b"},
    "reload": {"7a", "7b"},
    "sealing": {"8a", "8b"},
    "scrub": {"9"},
    "quota": set(),
    "audit": set(),
    "storage": {"11a", "11b"},
}


def _module(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@dataclass(frozen=True)
class Run:
    returncode: int
    output: str


@pytest.fixture(scope="module")
def bench_state(bundled_model_dir: Path, state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir of its own for the model benchmark: the session's PKI and keys copied, its
    converted model hard-linked (no second conversion), no shared audit trail to append to."""
    target = tmp_path_factory.mktemp("bench-state")
    for name in ("pki", "keys"):  # keys/ exists once some stack of the session has started
        if (state_dir / name).is_dir():
            shutil.copytree(state_dir / name, target / name)
    shutil.copytree(
        bundled_model_dir.parent,
        target / "models",
        copy_function=os.link,
        ignore=shutil.ignore_patterns("*.lock"),
    )
    return target


@pytest.fixture(scope="module")
def quick_runs(
    bench_state: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[Path, dict[str, Run]]:
    results = tmp_path_factory.mktemp("bench-results")
    runs = {}
    # The storage benchmark uses the session's Ceph (tests/ceph.py) rather than starting its own.
    site: S3Site | None = None
    with contextlib.suppress(pytest.skip.Exception):  # no Ceph here: the storage rows stay "not measured"
        site = request.getfixturevalue("s3_site")
    for name in ROWS:
        start = time.monotonic()
        extra = ["--state-dir", str(bench_state)] if name == "model_tokens" else []
        if name == "storage":
            if site is None:
                continue
            extra = ["--endpoint", site.endpoint, "--credentials-file", str(site.credentials_file)]
        proc = subprocess.run(
            [
                sys.executable,
                str(BENCH / f"{name}.py"),
                "--quick",
                "--out",
                str(results / f"{name}.json"),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        runs[name] = Run(proc.returncode, (proc.stdout + proc.stderr)[-4000:])
        print(f"bench/{name}.py --quick: exit {proc.returncode} after {time.monotonic() - start:.0f} s")
    return results, runs


def _check_row(row: dict[str, Any], keys: tuple[str, ...]) -> None:
    assert set(keys) <= set(row), row
    assert isinstance(row["measured"], int | float) and isinstance(row["limit"], int | float)
    assert row["op"] in ("<=", ">=")
    assert isinstance(row["met"], bool)
    # `met` is the bound applied to the same run's numbers, not a copied verdict.
    assert row["met"] == (
        row["measured"] <= row["limit"] if row["op"] == "<=" else row["measured"] >= row["limit"]
    )
    assert row["ratio"] is None or isinstance(row["ratio"], int | float)
    assert row["what"] and row["target"] and row["baseline"] and row["unit"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROWS))
def test_quick_run_writes_rows(name: str, quick_runs: tuple[Path, dict[str, Run]]) -> None:
    import json

    results, runs = quick_runs
    if name not in runs:
        pytest.skip(f"bench/{name}.py needs Ceph, which is not installed here")
    run = runs[name]
    assert run.returncode == 0, run.output
    report = json.loads((results / f"{name}.json").read_text())
    assert report["benchmark"] == name and report["quick"] is True
    assert {"date", "commit", "machine", "results"} <= set(report)
    assert report["machine"]["cpus"] >= 1
    ids = {row["id"] for row in report["rows"]}
    assert ROWS[name] <= ids and ids - ROWS[name] <= {"9-cuda"}, ids
    keys = _module("common").ROW_KEYS
    for row in report["rows"]:
        _check_row(row, keys)


@pytest.mark.slow
def test_report_renders_every_row(quick_runs: tuple[Path, dict[str, Run]], tmp_path: Path) -> None:
    results, runs = quick_runs
    doc = tmp_path / "benchmarks.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", doc)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results", str(results), "--doc", str(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = _module("report")
    text = doc.read_text()
    table = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    for rid in report.EXPECTED:
        assert f"\n| {rid} | " in table, rid
    unmeasured = [rid for rid, (bench, _what) in report.EXPECTED.items() if bench not in runs]
    assert table.count("not measured") == len(unmeasured)
    assert table.count("(quick run)") >= len(report.EXPECTED) - len(unmeasured)
    for name in runs:
        assert f"| {name} |" in table  # its date, commit and machine
    # What is outside the markers is left as it was.
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.split(report.BEGIN, 1)[0] == original.split(report.BEGIN, 1)[0]
    assert text.split(report.END, 1)[1] == original.split(report.END, 1)[1]


def test_report_lists_rows_not_measured() -> None:
    report = _module("report")
    table = report.markdown({})
    for rid in report.EXPECTED:
        assert f"\n| {rid} | " in table
    assert table.count("not measured") == len(report.EXPECTED)
