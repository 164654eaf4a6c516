"""`[quota]` and `[telemetry]` in the configuration file: defaults, a full table, each refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, QuotaConfig, TelemetryConfig, load
from tests.config_files import MINIMAL, load_config


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(tmp_path, MINIMAL, text)


def test_defaults_are_in_memory_quotas_and_no_traces(tmp_path: Path) -> None:
    cfg = load(None, state_dir=tmp_path)
    assert cfg.quota == QuotaConfig(backend="memory")
    assert cfg.telemetry == TelemetryConfig(traces=False)


def test_a_full_quota_and_telemetry_table(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [quota]
        backend = "redis"
        redis_url = "rediss://quota.internal:6380/2"
        key_prefix = "site-a:quota"
        lease_seconds = 120

        [telemetry]
        traces = true
        otlp_endpoint = "127.0.0.1:14317"
        service_name = "gw-a"
    """,
    )
    assert cfg.quota == QuotaConfig("redis", "rediss://quota.internal:6380/2", "site-a:quota", 120.0)
    assert cfg.telemetry == TelemetryConfig(True, "127.0.0.1:14317", "gw-a")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[quota]\nbackend = "memcached"\n', "quota.backend", 'must be "memory" or "redis"'),
        ('[quota]\nredis_url = "http://x"\n', "quota.redis_url", "must be a redis://"),
        ('[quota]\nkey_prefix = ""\n', "quota.key_prefix", "must not be empty"),
        ("[quota]\nlease_seconds = 0\n", "quota.lease_seconds", "must be > 0"),
        ("[quota]\nlimit = 5\n", "quota.limit", "unknown key"),
        ('[telemetry]\ntraces = "yes"\n', "telemetry.traces", "must be bool"),
        ('[telemetry]\notlp_endpoint = "collector"\n', "telemetry.otlp_endpoint", "must be HOST:PORT"),
        ("[telemetry]\nexporter = 1\n", "telemetry.exporter", "unknown key"),
    ],
)
def test_bad_quota_and_telemetry_keys_are_refused(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert err.value.key == key
    assert reason in err.value.reason
