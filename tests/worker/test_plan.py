"""Capacity planner: the arithmetic it prints, and the placements it refuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.isolation.plan import MODELS, GiB, PlanError, domain_shape, plan


def airlock_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())",
         "plan", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_maverick_fp8_fits_an_8x_h100_group_with_the_arithmetic_printed() -> None:
    result = airlock_plan("--model", "llama4-maverick-fp8", "--domain", "h100", "--gpus", "8")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # 400e9 x 1 B = 372.53 GiB; 2*48*8*128*2 = 196,608 B/token x 430,000 = 78.74 GiB;
    # 8 x 81559 MiB = 637.18 GiB, 10% margin 63.72 GiB; total 514.98 GiB.
    assert "weights:  400,000,000,000 params x 1 B = 372.53 GiB" in out
    assert "196,608 B/token; x 430,000 tokens x 1 sequence(s) = 78.74 GiB" in out
    assert "domain:   8 x H100 80GB (79.65 GiB each) = 637.18 GiB" in out
    assert "margin:   10% of 637.18 GiB = 63.72 GiB" in out
    assert "= 514.98 GiB <= 637.18 GiB: fits (122.20 GiB spare)" in out


def test_maverick_on_a_mig_slice_is_refused_with_the_arithmetic() -> None:
    result = airlock_plan("--model", "llama4-maverick-fp8", "--domain", "mig-7g.80gb")
    assert result.returncode == 1
    err = result.stderr
    assert "refused: llama4-maverick-fp8 can't be placed on 1 x MIG 7g.80gb" in err
    assert "372.53 GiB + 78.74 GiB + 7.45 GiB = 458.71 GiB > 74.51 GiB: does NOT fit" in err
    assert result.stdout == ""


def test_mig_slices_cannot_be_grouped_even_for_a_small_model() -> None:
    with pytest.raises(PlanError, match="MIG slices can't be grouped"):
        plan(MODELS["smollm2-135m"], domain_shape("mig-1g.10gb", 2))


def test_maverick_bf16_needs_more_than_8x_h100_but_fits_8x_h200() -> None:
    bf16 = MODELS["llama4-maverick-bf16"]
    with pytest.raises(PlanError) as err:
        plan(bf16, domain_shape("h100", 8))
    assert "745.06 GiB + 78.74 GiB + 63.72 GiB = 887.51 GiB > 637.18 GiB" in str(err.value)
    assert plan(bf16, domain_shape("h200", 8)).fits


def test_scout_and_smollm2() -> None:
    scout = plan(MODELS["llama4-scout"], domain_shape("h100", 8))
    assert round(scout.weights / GiB, 2) == 203.03 and round(scout.kv / GiB, 2) == 192.0
    with pytest.raises(PlanError):
        plan(MODELS["llama4-scout"], domain_shape("h100", 1))
    small = plan(MODELS["smollm2-135m"], domain_shape("mig-1g.10gb"))
    assert small.kv == 2 * 30 * 3 * 64 * 2 * 8192


def test_concurrency_scales_the_kv_cache_until_it_no_longer_fits() -> None:
    result = airlock_plan("--model", "llama4-maverick-fp8", "--domain", "h100", "--gpus", "8",
                          "--concurrency", "4")  # fmt: skip
    assert result.returncode == 1
    assert "x 430,000 tokens x 4 sequence(s) = 314.94 GiB" in result.stderr


def test_unknown_model_or_domain_is_a_usage_error() -> None:
    assert airlock_plan("--model", "gpt-9").returncode == 2
    result = airlock_plan("--domain", "tpu")
    assert result.returncode == 1 and "unknown domain 'tpu'" in result.stderr
