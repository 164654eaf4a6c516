"""A --quick (smoke) benchmark run never replaces the committed results or the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_quick_run_writes_to_a_scratch_dir_not_bench_results() -> None:
    code = (
        "import sys; sys.path.insert(0, 'bench')\n"
        "from common import QUICK_RESULTS, RESULTS, write_report\n"
        "write_report(RESULTS / 'smoke-probe.json', 'smoke-probe', [], {}, quick=True)\n"
        "print(QUICK_RESULTS)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    scratch = Path(done.stdout.strip().splitlines()[-1])
    assert not (ROOT / "bench" / "results" / "smoke-probe.json").exists()
    written = scratch / "smoke-probe.json"
    assert json.loads(written.read_text())["quick"] is True
    written.unlink()


def test_make_bench_quick_reads_the_scratch_dir_and_writes_no_doc() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert (
        "bench/report.py $(if $(findstring --quick,$(BENCH_FLAGS)),--results $(QUICK_RESULTS) --no-doc)"
        in makefile
    )
