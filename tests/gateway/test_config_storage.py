"""`[s3]`, s3:// model paths and `[audit.archive]` in the configuration file: a full table, the
defaults, and each refusal (above all: never a key in the file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import AuditArchiveConfig, load
from serving.settings import S3Settings
from tests.config_files import MINIMAL, load_config, refused_config

S3 = """
[s3]
endpoint = "https://rgw.site:7480"
region = "site"
ca_file = "/etc/airlock/rgw-ca.pem"
credentials_file = "/etc/airlock/s3.credentials"
parallel = 4
part_bytes = 1048576
timeout_seconds = 5.0
"""


def test_no_store_by_default_and_the_archive_off(tmp_path: Path) -> None:
    cfg = load(None, state_dir=tmp_path)
    assert cfg.s3 is None and cfg.audit.archive == AuditArchiveConfig() and not cfg.audit.archive.url


def test_a_full_s3_table_an_s3_model_and_an_archive(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, MINIMAL, S3, """
        [models.llama]
        engine = "vllm"
        path = "s3://models/llama/v3"
        [audit.archive]
        url = "s3://airlock-audit/{host}"
        retention_days = 2555
        seal_key = "/etc/airlock/keys/archive.key"
        poll_seconds = 2.0
        max_backlog_segments = 10
    """)  # fmt: skip
    etc = Path("/etc/airlock")
    assert cfg.s3 == S3Settings("https://rgw.site:7480", region="site", ca_file=etc / "rgw-ca.pem",
                                credentials_file=etc / "s3.credentials", parallel=4, part_bytes=1 << 20,
                                timeout_seconds=5.0)  # fmt: skip
    assert cfg.models["llama"].path == "s3://models/llama/v3"
    archive = AuditArchiveConfig("s3://airlock-audit/{host}", 2555, etc / "keys/archive.key", 2.0, 10)
    assert cfg.audit.archive == archive


@pytest.mark.parametrize("name", ["access_key", "secret_key", "secret_access_key", "access_key_id"])
def test_a_key_in_the_file_is_refused_without_repeating_it(tmp_path: Path, name: str) -> None:
    err = refused_config(tmp_path, MINIMAL, S3, f'{name} = "hunter2-secret"\n')
    assert err.key == f"s3.{name}" and "never the key itself" in err.reason
    assert "hunter2" not in str(err)


@pytest.mark.parametrize(
    ("parts", "key"),
    [
        ('[models.m]\npath = "s3://models/m"\n', "models.m.path"),  # no [s3]
        ('[audit.archive]\nurl = "s3://audit/x"\n', "audit.archive.url"),  # no [s3]
        ('[s3]\nendpoint = "rgw.site:7480"\n', "s3.endpoint"),
        ('[s3]\nregion = "x"\n', "s3.endpoint"),
        ('[s3]\nendpoint = "http://r:1"\naccess_key_env = "A B"\n', "s3.access_key_env"),
        ('[s3]\nendpoint = "http://r:1"\nparallel = 0\n', "s3.parallel"),
        ('[s3]\nendpoint = "http://r:1"\n[models.m]\npath = "s3://Bad_Bucket/m"\n', "models.m.path"),
        ('[s3]\nendpoint = "http://r:1"\n[audit.archive]\nurl = "https://x/y"\n', "audit.archive.url"),
        ('[s3]\nendpoint = "http://r:1"\n[audit.archive]\nurl = "s3://a-b/c"\nretention_days = 0\n',
         "audit.archive.retention_days"),
    ],
)  # fmt: skip
def test_refusals_name_the_key(tmp_path: Path, parts: str, key: str) -> None:
    assert refused_config(tmp_path, MINIMAL, parts).key == key
