"""`config.load`: documented defaults, a full file, and every refusal naming file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock.types import Limits
from gateway.config import (
    AuthConfig,
    ConfigError,
    GatewayConfig,
    IssuerConfig,
    LockoutConfig,
    ModelConfig,
    MtlsConfig,
    TenantConfig,
    TlsConfig,
    load,
)
from tests.config_files import MINIMAL, refused_config, write_config

EXAMPLE = Path(__file__).resolve().parents[2] / "airlock.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    return write_config(tmp_path, text)


def refused(tmp_path: Path, text: str) -> ConfigError:
    return refused_config(tmp_path, text)


def test_defaults_are_two_demo_tenants_on_the_bundled_model(tmp_path: Path) -> None:
    cfg = load(None, state_dir=tmp_path)
    assert cfg.source == "<defaults>"
    assert cfg.state_dir == tmp_path.absolute()
    assert cfg.models == {"smollm2": ModelConfig("smollm2", engine="transformers", path="bundled")}
    assert cfg.tenants == {
        "acme": TenantConfig("acme", ("smollm2",)),
        "globex": TenantConfig("globex", ("smollm2",)),
    }
    assert cfg.gateway == GatewayConfig()
    assert cfg.auth == AuthConfig()
    assert cfg.model_cache_dir == tmp_path.absolute() / "models"


def test_the_default_auth_algorithms_are_asymmetric() -> None:
    assert AuthConfig().issuers == (IssuerConfig("airlock-dev", None, ("EdDSA", "ES256")),)


def test_a_full_file_is_parsed(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    path = write(
        tmp_path,
        f"""
        state_dir = "{tmp_path / "configured-state"}"

        [gateway]
        listen = "0.0.0.0:9443"
        mtls_listen = "0.0.0.0:9444"
        metrics_listen = "127.0.0.1:9464"
        max_message_bytes = 65536
        grace_seconds = 3
        max_tokens = 512
        default_max_tokens = 64

        [auth]
        audience = "airlock-prod"
        leeway_seconds = 5
        max_token_bytes = 4096

        [[auth.issuers]]
        issuer = "https://idp.example"
        jwks_file = "{tmp_path / "jwks.json"}"
        algorithms = ["ES256", "RS256"]

        [[auth.issuers]]
        issuer = "airlock-dev"

        [auth.mtls]
        trust_domain = "bank.example"

        [tls]
        cert = "{tmp_path / "gw.crt"}"
        key = "{tmp_path / "gw.key"}"
        service_ca = "{tmp_path / "services-ca.pem"}"

        [lockout]
        max_failures = 3
        window_seconds = 10
        lockout_seconds = 60

        [models.local]
        engine = "transformers"
        path = "{weights}"
        threads = 4

        [models.echo]
        engine = "echo"
        tokens_per_second = 20

        [tenants.acme]
        models = ["local", "echo"]

        [tenants.globex-2]
        models = ["echo"]
        """,
    )
    cfg = load(path)
    assert cfg.source == str(path)
    assert cfg.state_dir == tmp_path / "configured-state"
    assert cfg.gateway == GatewayConfig(
        listen="0.0.0.0:9443",
        mtls_listen="0.0.0.0:9444",
        metrics_listen="127.0.0.1:9464",
        max_message_bytes=65536,
        grace_seconds=3.0,
        limits=Limits(max_tokens=512, default_max_tokens=64),
    )
    assert isinstance(cfg.gateway.grace_seconds, float)
    assert cfg.auth == AuthConfig(
        audience="airlock-prod",
        issuers=(
            IssuerConfig("https://idp.example", tmp_path / "jwks.json", ("ES256", "RS256")),
            IssuerConfig("airlock-dev", None, ("EdDSA", "ES256")),
        ),
        leeway_seconds=5,
        max_token_bytes=4096,
        mtls=MtlsConfig("bank.example"),
    )
    assert cfg.tls == TlsConfig(
        cert=tmp_path / "gw.crt", key=tmp_path / "gw.key", service_ca=tmp_path / "services-ca.pem"
    )
    files = cfg.tls_files
    assert (files.cert, files.service_ca) == (tmp_path / "gw.crt", tmp_path / "services-ca.pem")
    assert files.worker_ca == cfg.state_dir / "pki" / "ca.crt" and files.dev == (
        "worker_ca",
        "attestation_ca",
    )
    assert cfg.auth.dev_issuer == IssuerConfig("airlock-dev", None, ("EdDSA", "ES256"))
    assert cfg.lockout == LockoutConfig(3, 10.0, 60.0)
    assert cfg.models == {
        "local": ModelConfig("local", "transformers", str(weights), 0.0, 4),
        "echo": ModelConfig("echo", "echo", "bundled", 20.0, 0),
    }
    assert cfg.tenants == {
        "acme": TenantConfig("acme", ("local", "echo")),
        "globex-2": TenantConfig("globex-2", ("echo",)),
    }


def test_the_admin_socket_defaults_to_the_run_directory_and_can_be_moved_or_disabled(tmp_path: Path) -> None:
    assert load(write(tmp_path, MINIMAL), state_dir=tmp_path).admin_socket == (
        tmp_path / "run" / "gateway-admin.sock"
    )
    moved = write(tmp_path, '[gateway]\nadmin_socket = "/run/airlock/admin.sock"\n' + MINIMAL)
    assert load(moved, state_dir=tmp_path).admin_socket == Path("/run/airlock/admin.sock")
    off = write(tmp_path, '[gateway]\nadmin_socket = ""\n' + MINIMAL)
    assert load(off, state_dir=tmp_path).admin_socket is None


def test_gateway_processes_default_to_one_and_can_be_raised(tmp_path: Path) -> None:
    assert load(write(tmp_path, MINIMAL), state_dir=tmp_path).gateway.processes == 1
    assert (
        load(write(tmp_path, "[gateway]\nprocesses = 4\n" + MINIMAL), state_dir=tmp_path).gateway.processes
        == 4
    )


def test_the_new_auth_and_lockout_keys_are_parsed(tmp_path: Path) -> None:
    text = "[auth]\nmax_token_lifetime_seconds = 3600\n[lockout]\nmax_auth_failures_per_peer = 0\n" + MINIMAL
    cfg = load(write(tmp_path, text), state_dir=tmp_path)
    assert cfg.auth.max_token_lifetime_seconds == 3600
    assert cfg.lockout.max_auth_failures_per_peer == 0
    assert cfg.lockout.max_failures == LockoutConfig().max_failures


def test_the_state_dir_argument_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'state_dir = "{tmp_path / "from-file"}"\n' + MINIMAL)
    assert load(path, state_dir=tmp_path / "from-cli").state_dir == tmp_path / "from-cli"


def test_a_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL), state_dir=tmp_path)
    assert cfg.gateway == GatewayConfig()
    assert cfg.auth == AuthConfig()
    assert cfg.models == {"echo": ModelConfig("echo", engine="echo")}


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("colour = 'blue'\n" + MINIMAL, "colour", "unknown key"),
        ("[gateway]\ncolour = 'blue'\n" + MINIMAL, "gateway.colour", "unknown key"),
        ("[auth]\nissuer = 'x'\n" + MINIMAL, "auth.issuer", "unknown key"),
        ("[auth]\nissuers = 'x'\n" + MINIMAL, "auth.issuers", "must be list, got str"),
        ("[[auth.issuers]]\njwks_file = 'x'\n" + MINIMAL, "auth.issuers[0].issuer", "is required"),
        (
            "[[auth.issuers]]\nissuer = 'a'\n[[auth.issuers]]\nissuer = 'a'\n" + MINIMAL,
            "auth.issuers",
            "lists an issuer twice",
        ),
        ("[[auth.issuers]]\nissuer = 'a'\nkeys = 1\n" + MINIMAL, "auth.issuers[0].keys", "unknown key"),
        (
            "[auth.mtls]\ntrust_domain = 'Bad Domain'\n" + MINIMAL,
            "auth.mtls.trust_domain",
            "must be lowercase",
        ),
        ("[gateway]\nmtls_listen = 'nowhere'\n" + MINIMAL, "gateway.mtls_listen", 'or "" to disable'),
        ("[lockout]\nmax_failures = -1\n" + MINIMAL, "lockout.max_failures", "must be >= 0"),
        ("[lockout]\nwindow_seconds = 0\n" + MINIMAL, "lockout.window_seconds", "must be > 0"),
        (
            "[lockout]\nmax_auth_failures_per_peer = -1\n" + MINIMAL,
            "lockout.max_auth_failures_per_peer",
            "must be >= 0",
        ),
        ("[auth]\nmax_token_lifetime_seconds = 0\n" + MINIMAL, "auth.max_token_lifetime_seconds", "positive"),
        ("[gateway]\nadmin_socket = 5\n" + MINIMAL, "gateway.admin_socket", "must be str"),
        ("[gateway]\nadmin_socket = '/" + "s" * 120 + "'\n" + MINIMAL, "gateway.admin_socket", "at most 107"),
        ("policy_dir = '/no/such/policy'\n" + MINIMAL, "policy_dir", "is not a directory"),
        (MINIMAL + "[models.echo2]\nengine = 'echo'\nthread = 2\n", "models.echo2.thread", "unknown key"),
        (
            MINIMAL.replace('models = ["echo"]', 'models = ["echo"]\nmodel = "echo"'),
            "tenants.acme.model",
            "unknown key",
        ),
        ("gateway = 5\n" + MINIMAL, "gateway", "must be a table"),
        ("[gateway]\nmax_tokens = 'many'\n" + MINIMAL, "gateway.max_tokens", "must be int, got str"),
        ("[gateway]\nmax_tokens = true\n" + MINIMAL, "gateway.max_tokens", "must be int, got bool"),
        ("[gateway]\nmax_tokens = 1.5\n" + MINIMAL, "gateway.max_tokens", "must be int, got float"),
        ("[gateway]\ngrace_seconds = true\n" + MINIMAL, "gateway.grace_seconds", "must be float, got bool"),
        ("[gateway]\nlisten = 7443\n" + MINIMAL, "gateway.listen", "must be str, got int"),
        (
            "[[auth.issuers]]\nissuer = 'i'\nalgorithms = 'EdDSA'\n" + MINIMAL,
            "auth.issuers[0].algorithms",
            "must be list, got str",
        ),
        (
            "[gateway]\nmax_tokens = -5\n" + MINIMAL,
            "gateway.max_tokens",
            "must be a positive integer, got -5",
        ),
        ("[gateway]\nmax_tokens = 0\n" + MINIMAL, "gateway.max_tokens", "must be a positive integer, got 0"),
        ("[gateway]\nmax_message_bytes = -1\n" + MINIMAL, "gateway.max_message_bytes", "must be a positive"),
        ("[auth]\nmax_token_bytes = 0\n" + MINIMAL, "auth.max_token_bytes", "must be a positive"),
        (
            "[gateway]\nmax_tokens = 100\ndefault_max_tokens = 200\n" + MINIMAL,
            "gateway.default_max_tokens",
            "must not exceed gateway.max_tokens",
        ),
        ("[gateway]\ngrace_seconds = -1\n" + MINIMAL, "gateway.grace_seconds", "must be >= 0"),
        ("[gateway]\nlisten = 'localhost'\n" + MINIMAL, "gateway.listen", "must be HOST:PORT"),
        (
            "[[auth.issuers]]\nissuer = 'i'\nalgorithms = ['HS256']\n" + MINIMAL,
            "auth.issuers[0].algorithms",
            "'HS256' is not allowed (asymmetric only",
        ),
        (
            "[[auth.issuers]]\nissuer = 'i'\nalgorithms = ['EdDSA', 'HS512']\n" + MINIMAL,
            "auth.issuers[0].algorithms",
            "'HS512' is not allowed",
        ),
        (
            "[[auth.issuers]]\nissuer = 'i'\nalgorithms = ['none']\n" + MINIMAL,
            "auth.issuers[0].algorithms",
            "'none' is not allowed",
        ),
        (
            "[[auth.issuers]]\nissuer = 'i'\nalgorithms = []\n" + MINIMAL,
            "auth.issuers[0].algorithms",
            "must list at least one algorithm",
        ),
        ("[auth]\nleeway_seconds = 301\n" + MINIMAL, "auth.leeway_seconds", "must be between 0 and 300"),
        ("[auth]\nleeway_seconds = -1\n" + MINIMAL, "auth.leeway_seconds", "must be between 0 and 300"),
        ("[tenants.acme]\nmodels = ['echo']\n", "models", "must define at least one"),
        ("[models.echo]\nengine = 'echo'\n", "tenants", "must define at least one"),
        (
            "[models.Echo]\nengine = 'echo'\n[tenants.acme]\nmodels = ['Echo']\n",
            "models.Echo",
            "name must be",
        ),
        ("[models.m]\nengine = 'tgi'\n[tenants.a]\nmodels = ['m']\n", "models.m.engine", "must be one of"),
        (
            "[models.m]\npath = '/no/such/dir'\n[tenants.a]\nmodels = ['m']\n",
            "models.m.path",
            "'/no/such/dir' is not a directory",
        ),
        (
            "[models.m]\nengine = 'echo'\nthreads = -1\n[tenants.a]\nmodels = ['m']\n",
            "models.m.threads",
            ">= 0",
        ),
        (
            "[models.m]\nengine = 'echo'\ntokens_per_second = -1\n[tenants.a]\nmodels = ['m']\n",
            "models.m.tokens_per_second",
            ">= 0",
        ),
        (MINIMAL.replace('["echo"]', '["echo", "gpt"]'), "tenants.acme.models", "unknown model 'gpt'"),
        (MINIMAL.replace('["echo"]', "[]"), "tenants.acme.models", "must list at least one model"),
        (MINIMAL.replace('["echo"]', '["echo", "echo"]'), "tenants.acme.models", "lists a model twice"),
        (MINIMAL.replace("tenants.acme", "tenants.Acme"), "tenants.Acme", "name must be lowercase"),
        (MINIMAL.replace("tenants.acme", "tenants.-acme"), "tenants.-acme", "name must be lowercase"),
        (
            MINIMAL.replace("tenants.acme", 'tenants."acme corp"'),
            "tenants.acme corp",
            "name must be lowercase",
        ),
        (MINIMAL + "[tenants.globex]\n", "tenants.globex.models", "must list at least one model"),
        ("[gateway]\nprocesses = 0\n" + MINIMAL, "gateway.processes", "between 1 and 64"),
        ("[gateway]\nprocesses = 65\n" + MINIMAL, "gateway.processes", "between 1 and 64"),
        ("[gateway]\nprocesses = '2'\n" + MINIMAL, "gateway.processes", "must be int"),
    ],
)
def test_bad_files_name_the_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = refused(tmp_path, text)
    assert err.key == key
    assert reason in err.reason


@pytest.mark.parametrize(
    "text", ["[gateway\nlisten = 1", "a = ", "[models.m]\n[models.m]\n", "x = 'unterminated"]
)
def test_invalid_toml_is_refused(tmp_path: Path, text: str) -> None:
    err = refused(tmp_path, text)
    assert err.key == "-"
    assert err.reason.startswith("not valid TOML")


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path, state_dir=tmp_path)
    assert (info.value.source, info.value.key) == (str(path), "-")
    assert info.value.reason == "cannot read file (No such file or directory)"


def test_a_directory_is_refused_as_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, state_dir=tmp_path)
    assert info.value.reason.startswith("cannot read file")


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n" + MINIMAL.encode())
    with pytest.raises(ConfigError) as info:
        load(path, state_dir=tmp_path)
    assert info.value.key == "-"


@pytest.mark.parametrize("entry", ["{ name = 'echo' }", "['echo']"])
def test_a_tenant_model_that_is_not_a_string_is_refused(tmp_path: Path, entry: str) -> None:
    err = refused(tmp_path, MINIMAL.replace('["echo"]', f"[{entry}]"))
    assert err.key == "tenants.acme.models"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="airlock.example.toml is not in the repository yet")
def test_the_example_file_parses(tmp_path: Path) -> None:
    cfg = load(EXAMPLE, state_dir=tmp_path)
    assert cfg.models and cfg.tenants


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[auth.mtls]\nca_file = "/x.pem"', "auth.mtls.ca_file", "moved: the service CA is [tls] service_ca"),
        (
            '[sealing]\nattestation_ca = "/x.crt"',
            "sealing.attestation_ca",
            "moved: the attestation CA is [tls] attestation_ca",
        ),
        ('[tls]\ncert = "/x.crt"', "tls.key", "set tls.cert and tls.key together"),
        ('[tls]\nworker_key = "/x"', "tls.worker_key", "unknown key"),
    ],
)
def test_tls_keys_and_the_ones_they_replaced(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    path = tmp_path / "airlock.toml"
    path.write_text(toml + '\n[models.m]\nengine = "echo"\n[tenants.t]\nmodels = ["m"]\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert (err.value.key, err.value.reason) == (key, reason)
