"""A GPU domain's two scrubs (device memory, then the host arena) reported as one result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from control.supervisor import Domain, merge_scrubs, run_scrub


def test_a_gpu_domain_result_covers_device_and_arena() -> None:
    device = {"verified": True, "bytes": 100 << 30, "seconds": 0.5, "canary_hits": 0, "reason": ""}
    arena = {"verified": True, "bytes": 16 << 20, "seconds": 0.01, "canaries_before": 16, "canary_hits": 0}
    merged = merge_scrubs(device, arena)
    assert merged["bytes"] == (100 << 30) + (16 << 20) and merged["device_bytes"] == 100 << 30
    assert merged["verified"] and merged["canaries_before"] == 16 and merged["reason"] == ""
    assert merged["gbps"] == round(merged["bytes"] / 0.51 / 1e9, 3)


def test_an_arena_failure_fails_the_gpu_domain_and_says_where() -> None:
    device = {"verified": True, "bytes": 1 << 30, "seconds": 0.1}
    arena = {"verified": False, "bytes": 0, "seconds": 0.0, "canary_hits": 2, "reason": "2 canary hit(s)"}
    merged = merge_scrubs(device, arena)
    assert (
        not merged["verified"] and merged["canary_hits"] == 2 and merged["reason"] == "arena: 2 canary hit(s)"
    )


def test_a_gpu_domain_without_a_visible_gpu_stays_out_of_service(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: this checks the refusal when none is")
    domain = Domain.for_worker(tmp_path, "worker-acme-m", ("GPU-00000000-0000-0000-0000-000000000000",))
    result = run_scrub(sys.executable, domain)
    assert not result["verified"] and result["reason"].startswith("GPU memory:")
