"""The worker sets the offline settings for transformers, the hub and vLLM itself before anything
loads, whatever the operator's environment says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import main as worker_main


def test_the_worker_sets_offline_env_before_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in worker_main.OFFLINE_ENV:
        monkeypatch.setenv(name, "0")  # an operator's environment that says otherwise
    seen: dict[str, str] = {}

    async def serve(settings: worker_main.WorkerSettings) -> None:
        seen.update({name: os.environ[name] for name in worker_main.OFFLINE_ENV})

    monkeypatch.setattr(worker_main, "serve", serve)
    argv = ["--tenant", "acme", "--model", "m", "--cache-dir", str(tmp_path), "--tls-cert", "c",
            "--tls-key", "k", "--client-ca", "ca", "--attest-cert", "ac", "--attest-key", "ak"]  # fmt: skip
    assert worker_main.main(argv) == 0
    assert seen["HF_HUB_OFFLINE"] == seen["TRANSFORMERS_OFFLINE"] == "1"
    assert seen["HF_HUB_DISABLE_TELEMETRY"] == seen["VLLM_NO_USAGE_STATS"] == seen["DO_NOT_TRACK"] == "1"
