"""The worker sets the offline settings for transformers, the hub and vLLM itself before anything
loads, whatever the operator's environment says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.settings import TenantIdentity, TlsFiles, WorkerSettings
from worker import main as worker_main


def test_the_worker_sets_offline_env_before_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in worker_main.OFFLINE_ENV:
        monkeypatch.setenv(name, "0")  # an operator's environment that says otherwise
    seen: dict[str, str] = {}

    async def serve(settings: WorkerSettings, ready_file: Path | None) -> None:
        seen.update({name: os.environ[name] for name in worker_main.OFFLINE_ENV})

    monkeypatch.setattr(worker_main, "serve", serve)
    path = tmp_path / "w.settings.json"
    tls = TlsFiles(Path("c"), Path("k"), Path("ca"))
    WorkerSettings((TenantIdentity("acme", Path("ac"), Path("ak")),), "m", tls, tmp_path).write(path)
    assert worker_main.main(["--settings", str(path)]) == 0
    assert seen["HF_HUB_OFFLINE"] == seen["TRANSFORMERS_OFFLINE"] == "1"
    assert seen["HF_HUB_DISABLE_TELEMETRY"] == seen["VLLM_NO_USAGE_STATS"] == seen["DO_NOT_TRACK"] == "1"


def test_a_settings_file_the_worker_refuses_stops_it_naming_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in worker_main.OFFLINE_ENV:  # restored afterwards: main() sets them
        monkeypatch.setenv(name, "0")
    path = tmp_path / "w.settings.json"
    path.write_text('{"model": "m"}')
    assert worker_main.main(["--settings", str(path)]) == 2
    assert f"python -m worker: settings file {path}: field tenants: required" in capsys.readouterr().err
