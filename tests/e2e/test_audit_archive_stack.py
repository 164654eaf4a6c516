"""End to end: a stack with `[audit.archive]` ships the gateway's and the supervisor's trails to the
local Ceph RGW while it serves (the archive has its own health service), and at shutdown their
closing signatures land there too; `airlock audit verify --archive` then agrees with the trail."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from control.cli import main as airlock
from gateway.archive import ArchiveLayout
from serving.s3 import ObjectStore, S3Settings
from tests.ceph import S3Site
from tests.conftest import ECHO_TOML
from tests.support import LiveStack


async def test_a_stack_archives_both_trails_and_verify_agrees(
    make_stack: Callable[[str], LiveStack],
    s3_site: S3Site,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"s3://audit-{secrets.token_hex(4)}/{{host}}"
    audit = tmp_path / "audit"
    archive = f'[audit.archive]\nurl = "{url}"\nretention_days = 1\n'
    toml = ECHO_TOML + s3_site.toml() + f'\n[audit]\npath = "{audit / "gateway.jsonl"}"\n' + archive
    stack = make_stack(toml)
    assert await stack.health("airlock.audit.archive") == "SERVING"
    async with stack.client("acme") as client:
        await client.generate("hello", model="echo", max_tokens=4)
    config = Path(stack.stack.config.source)
    stack.stack.stop(timeout=5)
    store = ObjectStore(S3Settings(s3_site.endpoint, credentials_file=s3_site.credentials_file))
    for log in ("gateway.jsonl", "supervisor.jsonl"):
        layout = ArchiveLayout.of(url, log)
        heads = store.keys(layout.url.bucket, layout.heads_prefix)
        last = json.loads((audit / f"{log}.sig").read_bytes().splitlines()[-1])
        assert layout.head_key(last["seq"], last["hash"]) in heads, f"{log}: the closing signature"
    state = str(stack.stack.config.state_dir)
    code = airlock(["audit", "verify", "--config", str(config), "--state-dir", state, "--dir", str(audit),
                    "--archive"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("archived head(s) checked") == 2
