"""`[tenants.T] isolation` and `[shared] domains`: defaults, shared placement, and every refusal; the
launcher's plan puts every shared tenant of a model on one worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.launcher import Stack
from gateway.config import ConfigError, load
from gateway.config.isolation import shared_models
from tests.config_files import refused_config, write_config

SHARING = '[tenants.acme]\nmodels = ["echo"]\nisolation = "shared"\n'
BASE = """
[models.echo]
engine = "echo"

[models.other]
engine = "echo"
"""


def write(tmp_path: Path, text: str) -> Path:
    return write_config(tmp_path, BASE, text)


def refused(tmp_path: Path, text: str) -> ConfigError:
    return refused_config(tmp_path, BASE, text)


def test_dedicated_is_the_default(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[tenants.acme]\nmodels = ["echo"]\n'), state_dir=tmp_path)
    assert cfg.tenants["acme"].isolation == "dedicated"
    assert cfg.shared_domains == {} and shared_models(cfg) == {}


def test_shared_tenants_of_a_model_share_one_worker_with_an_optional_gpu_domain(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, """
        [tenants.globex]
        models = ["echo", "other"]
        isolation = "shared"

        [tenants.acme]
        models = ["echo"]
        isolation = "shared"

        [tenants.initech]
        models = ["echo"]
        domains = { echo = ["GPU-1"] }

        [shared]
        domains = { echo = ["GPU-2", "GPU-3"] }
    """), state_dir=tmp_path)  # fmt: skip
    assert shared_models(cfg) == {"echo": ("acme", "globex"), "other": ("globex",)}
    assert cfg.shared_domains == {"echo": ("GPU-2", "GPU-3")}
    assert cfg.tenants["initech"].isolation == "dedicated"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = "pooled"\n', "tenants.acme.isolation",
         'must be "dedicated" or "shared"'),
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = true\n', "tenants.acme.isolation", "must be str"),
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = "shared"\ndomains = { echo = ["GPU-1"] }\n',
         "tenants.acme.domains", "a shared tenant has no domain of its own"),
        (SHARING + '[shared]\ndomains = { other = ["GPU-1"] }\n',
         "shared.domains.other", 'no tenant with isolation = "shared" has it'),
        ('[tenants.acme]\nmodels = ["echo"]\n[shared]\ndomains = { echo = ["GPU-1"] }\n',
         "shared.domains.echo", 'no tenant with isolation = "shared" has it'),
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = "shared"\n[tenants.initech]\nmodels = ["echo"]\n'
         'domains = { echo = ["GPU-1"] }\n[shared]\ndomains = { echo = ["GPU-1"] }\n',
         "shared.domains.echo", "GPU-1 is already the domain of tenants.initech.domains.echo"),
        (SHARING + '[shared]\ndomains = { echo = ["MIG-a", "MIG-b"] }\n',
         "shared.domains.echo", "MIG slices can't be grouped"),
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = "shared"\n[shared]\ndomains = { echo = ["cpu0"] }\n',
         "shared.domains.echo", "must list CUDA UUIDs"),
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = "shared"\n[shared]\npool = 2\n', "shared.pool",
         "unknown key"),
        ('[tenants.acme]\nmodels = ["echo"]\nisolation = "shared"\n[tenants.shared]\nmodels = ["echo"]\n',
         "tenants.shared", "reserved for shared workers"),
    ],
)  # fmt: skip
def test_nonsense_is_refused_with_the_key_and_why(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = refused(tmp_path, text)
    assert err.key == key and reason in err.reason, err


def test_the_launcher_starts_one_shared_worker_per_model_for_every_shared_tenant(tmp_path: Path) -> None:
    from control.pki import ensure_dev_pki

    cfg = load(write(tmp_path, """
        [tenants.acme]
        models = ["echo"]
        isolation = "shared"

        [tenants.globex]
        models = ["echo"]
        isolation = "shared"

        [tenants.initech]
        models = ["echo"]

        [supervisor]
        scrub = "off"

        [shared]
        domains = { echo = ["GPU-7"] }
    """), state_dir=tmp_path / "state")  # fmt: skip
    stack = Stack(cfg, run_dir=tmp_path / "run")
    plan = stack.worker_plan(ensure_dev_pki(cfg.state_dir))
    assert set(plan) == {("shared", "echo"), ("initech", "echo")}
    settings, domain = plan[("shared", "echo")]
    assert settings.tenant_names == ("acme", "globex")
    assert [t.attest_cert.name for t in settings.tenants] == ["acme.crt", "globex.crt"]
    assert settings.isolation == "shared"
    # Dedicated workers may leave state to the exit scrub; a shared one zeroes between tenants.
    assert settings.domain.scrub == "tenant-switch"
    assert domain.devices == ("GPU-7",) and domain.env == {"CUDA_VISIBLE_DEVICES": "GPU-7"}
    dedicated, _ = plan[("initech", "echo")]
    assert dedicated.isolation == "dedicated" and dedicated.domain.scrub == "off"
    assert dedicated.tenant_names == ("initech",)
