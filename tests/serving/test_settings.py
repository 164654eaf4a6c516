"""The worker's settings file: written and read back unchanged, every refusal naming the file and the
field, and the settings the launcher builds for a dedicated worker, a shared one and a GPU domain."""

from __future__ import annotations

import copy
import json
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

from airlock.attestation import SUITES
from serving.settings import (
    BundleTrust,
    DomainSettings,
    RequestLimits,
    S3Settings,
    SettingsError,
    TenantIdentity,
    TlsFiles,
    WorkerSettings,
)
from worker.isolation.arena import SCRUB_MODES


def every_field() -> WorkerSettings:
    """Settings with no field left at its default: a round trip must carry each one."""
    return WorkerSettings(
        tenants=(TenantIdentity("acme", Path("/a/acme.crt"), Path("/a/acme.key")),
                 TenantIdentity("globex", Path("/a/globex.crt"), Path("/a/globex.key"))),
        model="llama-3b",
        tls=TlsFiles(Path("/t/w.crt"), Path("/t/w.key"), Path("/t/ca.crt"), allowed_peer="gw"),
        cache_dir=Path("/cache"),
        engine="vllm",
        model_path="s3://models/llama",
        listen="0.0.0.0:7450",
        isolation="shared",
        domain=DomainSettings(device="cuda", arena=Path("/dev/shm/a"), arena_bytes=4 << 20,
                              canary_file=Path("/run/c.json"), scrub="tenant-switch", tensor_parallel_size=2),
        bundles=BundleTrust(Path("/k/trusted.pem"), require_signed=False, signing_key=Path("/k/dev.key")),
        limits=RequestLimits(max_tokens=512, default_max_tokens=64, max_message_bytes=1 << 20),
        hpke_suite="x25519",
        threads=4,
        echo_tokens_per_second=20.5,
        max_model_len=8192,
        allow_special_tokens=True,
        grace_seconds=3.0,
        s3=S3Settings("https://rgw.site:7480", region="site", ca_file=Path("/k/rgw-ca.pem"),
                      credentials_file=Path("/k/s3.credentials"), access_key_env="A", secret_key_env="B",
                      parallel=4, part_bytes=1 << 20, timeout_seconds=5.0),
    )  # fmt: skip


def test_settings_round_trip_through_json_and_a_file(tmp_path: Path) -> None:
    settings = every_field()
    defaults = WorkerSettings(settings.tenants[:1], "m", settings.tls, Path("/c"))
    for name in WorkerSettings.__dataclass_fields__:  # the example really sets every field
        if name not in ("tenants", "tls", "cache_dir"):
            assert getattr(settings, name) != getattr(defaults, name), name
    assert WorkerSettings.from_json(settings.to_json()) == settings
    path = tmp_path / "w.settings.json"
    settings.write(path)
    assert WorkerSettings.load(path) == settings
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # owner only, like the rest of run/
    assert [p.name for p in tmp_path.iterdir()] == ["w.settings.json"]  # no temporary file left
    settings.write(path)  # replaced in place
    assert json.loads(path.read_text())["tenants"][1] == {
        "name": "globex", "attest_cert": "/a/globex.crt", "attest_key": "/a/globex.key"
    }  # fmt: skip


def test_a_short_file_takes_the_documented_defaults() -> None:
    settings = WorkerSettings.from_json(json.dumps(MINIMAL))
    assert settings.engine == "transformers" and settings.model_path == "bundled"
    assert settings.listen == "127.0.0.1:0" and settings.isolation == "dedicated"
    assert settings.domain == DomainSettings() and settings.domain.scrub == "request"
    assert settings.bundles.require_signed and settings.bundles.trusted_keys is None
    assert settings.limits.limits().max_tokens == 1024 and settings.hpke_suite == SUITES[0]
    assert settings.tenant == "acme" and settings.tenant_names == ("acme",)
    assert settings.tls.allowed_peer == "airlock-gateway"


def test_the_choices_are_the_workers_own() -> None:
    from serving import settings as module

    assert module.SCRUB_MODES == SCRUB_MODES
    with pytest.raises(SettingsError, match="must be one of mlkem768-x25519, x25519"):
        WorkerSettings(MINIMAL_SETTINGS.tenants, "m", MINIMAL_SETTINGS.tls, Path("/c"), hpke_suite="rsa")


def test_the_docs_example_is_a_valid_settings_file() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    block = text.split("## Worker settings", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    settings = WorkerSettings.from_json(block, "docs/config.md")
    assert settings.domain.device == "cuda" and settings.bundles.trusted_keys is not None


MINIMAL: dict[str, Any] = {
    "tenants": [{"name": "acme", "attest_cert": "acme.crt", "attest_key": "acme.key"}],
    "model": "smollm2",
    "cache_dir": "/cache",
    "tls": {"cert": "w.crt", "key": "w.key", "client_ca": "ca.crt"},
}
MINIMAL_SETTINGS = WorkerSettings.from_json(json.dumps(MINIMAL))
GLOBEX = {"name": "globex", "attest_cert": "g.crt", "attest_key": "g.key"}


def edit(path: str, value: object) -> dict[str, Any]:
    """MINIMAL with one value set (`a.b`, `tenants[1]`); a value of DELETE removes the key."""
    out = copy.deepcopy(MINIMAL)
    node: Any = out
    parts = path.replace("[", ".[").split(".")
    for part in parts[:-1]:
        key: Any = int(part[1:-1]) if part.startswith("[") else part
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    last: Any = int(parts[-1][1:-1]) if parts[-1].startswith("[") else parts[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list) and last == len(node):
        node.append(value)
    else:
        node[last] = value
    return out


DELETE = object()
SHARED_TWO = {"isolation": "shared", "tenants": [MINIMAL["tenants"][0], GLOBEX]}

REFUSALS = [
    # (what the file holds, the field named, the reason)
    (edit("modle", "x"), "modle", "unknown field"),
    (edit("tls.certificate", "x"), "tls.certificate", "unknown field"),
    (edit("tls", DELETE), "tls", "required"),
    (edit("tls.client_ca", DELETE), "tls.client_ca", "required"),
    # Each tenant needs its own attestation certificate and key.
    (edit("tenants[1]", {"name": "globex", "attest_cert": "g.crt"}), "tenants[1].attest_key", "required"),
    (edit("tenants", []), "tenants", "at least one tenant"),
    (edit("tenants", {"acme": {}}), "tenants", "must be a list"),
    (edit("tenants[0]", "acme"), "tenants[0]", "must be an object"),
    (edit("tenants[0].name", "Acme Corp"), "tenants[0].name", "lower-case letters"),
    (edit("tenants[1]", MINIMAL["tenants"][0]) | {"isolation": "shared"}, "tenants[1].name", "named twice"),
    (edit("tenants[1]", GLOBEX), "isolation", 'several tenants needs isolation "shared"'),
    (edit("domain.scrub", "off") | SHARED_TWO, "domain.scrub", "zeroes state between tenants"),
    (edit("isolation", "pooled"), "isolation", "must be one of dedicated, shared"),
    (edit("model", "Llama 3B"), "model", "lower-case letters"),
    (edit("model", 3), "model", "must be a string"),
    (edit("engine", "torch"), "engine", "must be one of transformers, echo, vllm"),
    (edit("model_path", ""), "model_path", "bundled"),
    (edit("cache_dir", ""), "cache_dir", "non-empty string"),
    (edit("cache_dir", None), "cache_dir", "non-empty string"),
    (edit("listen", "localhost"), "listen", "HOST:PORT"),
    (edit("listen", "127.0.0.1:70000"), "listen", "HOST:PORT"),
    (edit("tls.allowed_peer", ""), "tls.allowed_peer", "must not be empty"),
    (edit("bundles.require_signed", "yes"), "bundles.require_signed", "true or false"),
    (edit("bundles.trusted_keys", 7), "bundles.trusted_keys", "must be a path"),
    (edit("domain.device", "tpu"), "domain.device", '"cpu", "cuda" or "cuda:N"'),
    (edit("domain.scrub", "sometimes"), "domain.scrub", "must be one of request, tenant-switch, off"),
    (edit("domain.arena_bytes", True), "domain.arena_bytes", "must be an integer"),
    (edit("domain.arena_bytes", 0), "domain.arena_bytes", "must be positive"),
    (edit("domain.tensor_parallel_size", 1.5), "domain.tensor_parallel_size", "must be an integer"),
    (edit("domain.tensor_parallel_size", 0), "domain.tensor_parallel_size", "must be positive"),
    (edit("limits.max_tokens", "1024"), "limits.max_tokens", "must be an integer"),
    (edit("limits.default_max_tokens", 2048), "limits.default_max_tokens", "must not exceed max_tokens"),
    (edit("limits.max_message_bytes", -1), "limits.max_message_bytes", "must be positive"),
    (edit("hpke_suite", "rsa-oaep"), "hpke_suite", "must be one of mlkem768-x25519, x25519"),
    (edit("threads", -1), "threads", "at least 0"),
    (edit("echo_tokens_per_second", "fast"), "echo_tokens_per_second", "must be a number"),
    (edit("grace_seconds", -1.0), "grace_seconds", "at least 0"),
    (edit("max_model_len", 0), "max_model_len", "must be positive"),
    (edit("allow_special_tokens", 1), "allow_special_tokens", "true or false"),
    (["not", "an", "object"], "", "must be an object"),
]


@pytest.mark.parametrize(("raw", "field", "reason"), REFUSALS, ids=[f"{r[1]}:{r[2]}" for r in REFUSALS])
def test_every_refusal_names_the_file_and_the_field(
    tmp_path: Path, raw: object, field: str, reason: str
) -> None:
    path = tmp_path / "w.settings.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SettingsError) as err:
        WorkerSettings.load(path)
    assert err.value.field == field and err.value.source == str(path)
    assert reason in err.value.reason
    where = f"field {field}: " if field else ""
    assert str(err.value) == f"settings file {path}: {where}{err.value.reason}"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('{"model": "a", "model": "b"}', "model", "given twice"),
        ("{'model': 'a'}", "", "not JSON: Expecting property name enclosed in double quotes (line 1"),
        # A number JSON's parser allows and a duration must not be.
        (json.dumps(MINIMAL)[:-1] + ', "grace_seconds": NaN}', "grace_seconds", "must be a number"),
    ],
)
def test_text_that_is_not_one_json_object_is_refused(text: str, field: str, reason: str) -> None:
    with pytest.raises(SettingsError) as err:
        WorkerSettings.from_json(text, "f.json")
    assert (err.value.field, err.value.source) == (field, "f.json") and reason in err.value.reason


def test_an_unreadable_file_is_refused_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"settings file .*missing\.json: cannot be read: No such file"):
        WorkerSettings.load(tmp_path / "missing.json")
    (tmp_path / "latin.json").write_bytes(b'{"model": "\xe9"}')
    with pytest.raises(SettingsError, match="not UTF-8"):
        WorkerSettings.load(tmp_path / "latin.json")


def test_settings_made_in_code_are_checked_too() -> None:
    """The launcher can't write a file the worker would refuse: the same checks run on construction."""
    tenants = (TenantIdentity("acme", Path("a"), Path("a")), TenantIdentity("globex", Path("g"), Path("g")))
    with pytest.raises(SettingsError) as err:
        WorkerSettings(tenants, "m", MINIMAL_SETTINGS.tls, Path("/c"), isolation="shared",
                       domain=DomainSettings(scrub="off"))  # fmt: skip
    assert err.value.field == "domain.scrub"


# The launcher's side: what it writes for each kind of worker.


def launcher_config(tmp_path: Path) -> Any:
    from gateway.config import load

    path = tmp_path / "airlock.toml"
    path.write_text(textwrap.dedent(f"""
        policy_dir = "{tmp_path}"

        [gateway]
        max_tokens = 2000
        default_max_tokens = 100
        max_message_bytes = 2097152

        [models.echo]
        engine = "echo"
        tokens_per_second = 50

        [models.big]
        engine = "vllm"
        path = "{tmp_path}"

        [models.smollm2]
        engine = "transformers"
        path = "bundled"
        threads = 2
        allow_special_tokens = true

        [tenants.acme]
        models = ["echo", "big", "smollm2"]
        domains = {{ big = ["GPU-aaa", "GPU-bbb"] }}

        [tenants.globex]
        models = ["echo"]
        isolation = "shared"

        [tenants.initech]
        models = ["echo"]
        isolation = "shared"

        [supervisor]
        scrub = "off"
        arena_mb = 8

        [sealing]
        hpke_suite = "x25519"
    """))  # fmt: skip
    return load(path, state_dir=tmp_path / "state")


@pytest.fixture
def plan(tmp_path: Path) -> tuple[Any, Any, dict[tuple[str, str], Any]]:
    from control.launcher import Stack
    from control.pki import ensure_dev_pki

    cfg = launcher_config(tmp_path)
    stack, pki = Stack(cfg, run_dir=tmp_path / "run"), ensure_dev_pki(cfg.state_dir)
    return stack, pki, stack.worker_plan(pki)


def test_the_launcher_writes_a_dedicated_workers_settings(plan: tuple[Any, Any, Any]) -> None:
    from control.pki import worker_attestation_cert

    stack, pki, workers = plan
    assert set(workers) == {("acme", "echo"), ("acme", "big"), ("acme", "smollm2"), ("shared", "echo")}
    settings, domain = workers[("acme", "echo")]
    attest = worker_attestation_cert(pki, "acme")
    assert settings.tenants == (TenantIdentity("acme", attest.cert, attest.key),)
    assert (settings.model, settings.engine, settings.isolation) == ("echo", "echo", "dedicated")
    assert settings.tls == TlsFiles(pki.worker_cert, pki.worker_key, pki.ca_cert)
    assert settings.cache_dir == stack.config.model_cache_dir and settings.listen == "127.0.0.1:0"
    assert settings.limits == RequestLimits(2000, 100, 2 << 20)
    assert settings.hpke_suite == "x25519" and settings.echo_tokens_per_second == 50
    assert settings.domain == DomainSettings("cpu", domain.arena, 8 << 20, domain.canaries, "off", 1)
    assert settings.bundles.trusted_keys == stack.config.bundle_trusted_keys
    bundled, _ = workers[("acme", "smollm2")]
    assert bundled.bundles.signing_key == pki.bundle_key  # signed with the dev key when converted
    assert workers[("acme", "big")][0].bundles.signing_key is None  # a model directory never is
    assert bundled.threads == 2 and bundled.allow_special_tokens and not settings.allow_special_tokens
    # What is written is what the worker loads.
    stack.run_dir.mkdir()
    stack._write_settings(("acme", "echo"), settings)
    path = stack.settings_file(("acme", "echo"))
    assert path.name == "worker-acme-echo.settings.json" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert WorkerSettings.load(path) == settings


def test_the_launcher_writes_a_shared_workers_settings(plan: tuple[Any, Any, Any]) -> None:
    _, _, workers = plan
    settings, domain = workers[("shared", "echo")]
    assert settings.tenant_names == ("globex", "initech") and settings.isolation == "shared"
    assert [t.attest_cert.name for t in settings.tenants] == ["globex.crt", "initech.crt"]
    # Dedicated workers may leave state to the exit scrub; a shared one zeroes between tenants.
    assert settings.domain.scrub == "tenant-switch" and settings.domain.arena == domain.arena


def test_the_launcher_gives_a_gpu_domain_its_devices(plan: tuple[Any, Any, Any]) -> None:
    _, _, workers = plan
    settings, domain = workers[("acme", "big")]
    assert domain.env == {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}
    assert settings.domain.device == "cuda" and settings.domain.tensor_parallel_size == 2
    assert settings.engine == "vllm" and settings.bundles.signing_key is None
    cpu, _ = workers[("acme", "echo")]
    assert cpu.domain.device == "cpu" and cpu.domain.tensor_parallel_size == 1
