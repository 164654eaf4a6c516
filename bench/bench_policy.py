"""The policy the benchmarks run under: the repository's, plus a `bench` tenant without quotas
(benchmarks measure the path, not the limits) whose `bench` subject may use every model."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_policy_dir(directory: Path) -> Path:
    shutil.copytree(ROOT / "policy", directory, ignore=shutil.ignore_patterns("*.md"))
    with (directory / "tenants.toml").open("a") as fh:
        fh.write('\n[tenants.bench]\nissuers = ["airlock-dev"]\n')
    with (directory / "policy.csv").open("a") as fh:
        fh.write("\ng, bench/bench, user, bench\n")
    return directory
