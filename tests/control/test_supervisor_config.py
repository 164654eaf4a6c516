"""The [supervisor] table and per-tenant GPU domains: defaults, values, and every refusal."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from control.supervisor import Domain
from gateway.config import Config, ConfigError, SupervisorConfig, load

BASE = """
[models.echo]
engine = "echo"

[models.big]
engine = "echo"

[tenants.acme]
models = ["echo", "big"]

[tenants.globex]
models = ["echo", "big"]
"""


def parse(tmp_path: Path, extra: str) -> Config:
    path = tmp_path / "airlock.toml"
    path.write_text(BASE + textwrap.dedent(extra))
    return load(path, state_dir=tmp_path)


def refused(tmp_path: Path, extra: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, extra)
    return err.value


def test_supervisor_defaults_and_values(tmp_path: Path) -> None:
    assert parse(tmp_path, "").supervisor == SupervisorConfig()
    cfg = parse(tmp_path, """
        [supervisor]
        restart = false
        backoff_seconds = 1
        backoff_max_seconds = 8.5
        metrics_listen = "127.0.0.1:9465"
        scrub = "tenant-switch"
        arena_mb = 64
    """)  # fmt: skip
    assert cfg.supervisor == SupervisorConfig(
        restart=False, backoff_seconds=1.0, backoff_max_seconds=8.5, metrics_listen="127.0.0.1:9465",
        scrub="tenant-switch", arena_mb=64,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ("[supervisor]\nscrub = 'sometimes'\n", "supervisor.scrub", "must be one of"),
        ("[supervisor]\nbackoff_seconds = 0\n", "supervisor.backoff_seconds", "> 0"),
        ("[supervisor]\narena_mb = 0\n", "supervisor.arena_mb", "positive"),
        ("[supervisor]\nrestart = 'yes'\n", "supervisor.restart", "bool"),
        ("[supervisor]\nmetrics_listen = 'nowhere'\n", "supervisor.metrics_listen", ""),
        ("[supervisor]\nwatchdog = 1\n", "supervisor.watchdog", "unknown key"),
    ],
)
def test_supervisor_refusals(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    err = refused(tmp_path, extra)
    assert err.key == key and reason in err.reason


def test_gpu_domains_pin_workers_and_belong_to_one_tenant(tmp_path: Path) -> None:
    cfg = parse(tmp_path, """
        [tenants.acme.domains]
        big = ["GPU-aaa", "GPU-bbb"]
        [tenants.globex.domains]
        big = ["MIG-ccc"]
    """)  # fmt: skip
    acme, globex = cfg.tenants["acme"], cfg.tenants["globex"]
    assert acme.domains == {"big": ("GPU-aaa", "GPU-bbb")} and globex.domains == {"big": ("MIG-ccc",)}
    domain = Domain.for_worker(tmp_path, "worker-acme-big", acme.domains["big"])
    assert domain.env == {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"} and domain.device == "cuda"
    cpu = Domain.for_worker(tmp_path, "worker-acme-echo")
    assert cpu.env == {"CUDA_VISIBLE_DEVICES": ""} and cpu.device == "cpu"  # sees no GPU at all


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("[tenants.acme.domains]\nbig = ['GPU-a']\n[tenants.globex.domains]\nbig = ['GPU-a']\n",
         "GPU-a is already the domain of tenants.acme.domains.big"),
        ("[tenants.acme.domains]\nbig = ['GPU-a']\necho = ['GPU-a']\n", "already the domain of"),
        ("[tenants.acme.domains]\nbig = ['MIG-a', 'MIG-b']\n", "MIG slices can't be grouped"),
        ("[tenants.acme.domains]\nbig = ['0']\n", "CUDA UUIDs"),
        ("[tenants.acme.domains]\nbig = []\n", "CUDA UUIDs"),
        ("[tenants.acme.domains]\nother = ['GPU-a']\n", "not one of this tenant's models"),
    ],
)  # fmt: skip
def test_gpu_domain_refusals(tmp_path: Path, extra: str, reason: str) -> None:
    assert reason in refused(tmp_path, extra).reason


def test_vllm_engine_needs_a_model_directory(tmp_path: Path) -> None:
    path = tmp_path / "airlock.toml"
    path.write_text('[models.m]\nengine = "vllm"\n[tenants.t]\nmodels = ["m"]\n')
    with pytest.raises(ConfigError) as err:
        load(path, state_dir=tmp_path)
    assert err.value.key == "models.m.path" and "local model directory" in err.value.reason
    (tmp_path / "maverick").mkdir()
    model_dir = tmp_path / "maverick"
    path.write_text(f'[models.m]\nengine = "vllm"\npath = "{model_dir}"\n[tenants.t]\nmodels = ["m"]\n')
    assert load(path, state_dir=tmp_path).models["m"].engine == "vllm"


def test_workers_are_pinned_to_their_domain(tmp_path: Path) -> None:
    from control.launcher import Stack
    from control.pki import ensure_dev_pki

    cfg = parse(tmp_path, """
        [tenants.acme.domains]
        big = ["GPU-aaa", "GPU-bbb"]
    """)  # fmt: skip
    stack = Stack(cfg, run_dir=tmp_path / "run")
    pki = ensure_dev_pki(tmp_path)
    acme = cfg.tenants["acme"]
    settings, domain = stack.worker_settings(pki, acme, cfg.models["big"])
    assert domain.env == {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}
    assert settings.domain.device == "cuda" and settings.domain.arena == domain.arena
    settings, domain = stack.worker_settings(pki, acme, cfg.models["echo"])
    assert domain.env == {"CUDA_VISIBLE_DEVICES": ""} and settings.domain.device == "cpu"
