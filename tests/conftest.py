"""Fixtures: real stacks (worker and gateway processes, real TLS) in temporary state directories.

One state directory serves the whole session, so the dev PKI is made once and the bundled model
is converted once; each stack gets its own run directory (logs, ready files) and port 0.
"""

from __future__ import annotations

import os

# Before grpc is imported: grpcio's fork handlers restart its poller in every child that
# subprocess.Popen forks (the launcher passes a preexec_fn), and closing fds before exec then
# aborts the child now and then ("epoll_wait error: Bad file descriptor", grpc/grpc#43055).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from control.launcher import Stack
from gateway import config as config_mod
from tests.ceph import CephCluster, S3Site
from tests.softhsm import SoftHsm
from tests.support import LiveStack

ECHO_TOML = """
[gateway]
max_tokens = 512
default_max_tokens = 64
max_message_bytes = 65536
grace_seconds = 10

[models.echo]
engine = "echo"

[models.slow]
engine = "echo"
tokens_per_second = 20

[tenants.acme]
models = ["echo", "slow"]

[tenants.globex]
models = ["echo"]
"""

MODEL_TOML = """
[gateway]
max_tokens = 512

[models.smollm2]
engine = "transformers"
path = "bundled"

[tenants.acme]
models = ["smollm2"]

[tenants.globex]
models = ["smollm2"]
"""


# Lockouts of identities (policy denials) and of peers (failed authentications) both off.
NO_LOCKOUT = "\n[lockout]\nmax_failures = 0\nmax_auth_failures_per_peer = 0\n"

REPO_POLICY = Path(__file__).resolve().parent.parent / "policy"
# The subjects tests call as ("tester" in each demo tenant), on top of the repository's policy.
TEST_GRANTS = """
g, acme/tester, user, acme
g, globex/tester, user, globex
"""


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


def make_policy_dir(directory: Path, extra_lines: str = TEST_GRANTS) -> Path:
    """A copy of the repository's policy with `extra_lines` appended to policy.csv."""
    shutil.copytree(REPO_POLICY, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md"))
    with (directory / "policy.csv").open("a") as fh:
        fh.write(textwrap.dedent(extra_lines))
    return directory


def _start(state_dir: Path, run_dir: Path, toml: str) -> Stack:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "airlock.toml"
    toml = textwrap.dedent(toml)
    if "policy_dir" not in toml:
        toml = f'policy_dir = "{make_policy_dir(run_dir / "policy")}"\n' + toml
    path.write_text(toml)
    cfg = config_mod.load(path, state_dir=state_dir)
    stack = Stack(cfg, run_dir=run_dir, listen="127.0.0.1:0")
    stack.start(timeout=float(__import__("os").environ.get("STACK_TIMEOUT", "600")))
    return stack


@pytest.fixture(scope="session")
def echo_stack(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    # Every test's refused tokens come from 127.0.0.1: with lockouts on, the order tests run in
    # would decide which of them gets LOCKED_OUT instead of its own reason. Lockouts are tested on
    # private stacks.
    toml = ECHO_TOML + NO_LOCKOUT
    stack = _start(state_dir, tmp_path_factory.mktemp("echo-run"), toml)
    yield LiveStack(stack)
    stack.stop()


@pytest.fixture(scope="session")
def model_stack(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    stack = _start(state_dir, tmp_path_factory.mktemp("model-run"), MODEL_TOML)
    yield LiveStack(stack)
    stack.stop()


@pytest.fixture
def make_stack(state_dir: Path, tmp_path: Path) -> Iterator[Callable[[str], LiveStack]]:
    """Start a private stack for a test that breaks it (kills a worker, stops the gateway)."""
    stacks: list[Stack] = []

    def make(toml: str = ECHO_TOML) -> LiveStack:
        stack = _start(state_dir, tmp_path / f"run{len(stacks)}", toml)
        stacks.append(stack)
        return LiveStack(stack)

    yield make
    for stack in stacks:
        stack.stop(timeout=5)


@pytest.fixture(scope="session")
def bundled_model_dir(state_dir: Path) -> Path:
    """The converted bundled model (the same copy the model stack's workers use, signed alike)."""
    from control.pki import ensure_dev_pki
    from worker.engines.models import BundlePolicy, resolve_model

    pki = ensure_dev_pki(state_dir)
    policy = BundlePolicy(pki.bundle_trusted, True, pki.bundle_key)
    return resolve_model("bundled", state_dir / "models", policy)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session (installed by scripts/bootstrap.sh)."""
    from tests.redis_server import RedisServer

    if RedisServer.binary() is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it with apt as root)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A fresh SoftHSM2 token for the session (softhsm2 is installed by scripts/bootstrap.sh)."""
    from tests.softhsm import make_token, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    token = make_token(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(token.conf))
        yield token


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A real single-node Ceph with an S3 endpoint (radosgw) for the session, torn down at its end
    (ceph-mon, ceph-osd, radosgw are installed by scripts/bootstrap.sh)."""
    from tests.ceph import CephCluster, unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def s3_site(ceph: CephCluster) -> S3Site:
    assert ceph.site is not None
    return ceph.site
