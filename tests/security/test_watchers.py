"""The gateway's file watchers outlive anything a file or the file system does (issue 15, item 4).

A watcher that dies stops every later change: a revocation, a withdrawn signing key, a rotated tenant
key would wait for a restart. Each test breaks a watcher the way a file, a loader bug or the file
system can, then shows that a later good change still takes effect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from airlock.errors import AuthenticationError
from gateway import watching
from gateway.audit import AuditLog
from gateway.auth.identity import JwtVerifier
from gateway.config import AuthConfig
from gateway.main import watch_jwks
from gateway.metrics import Metrics
from gateway.policy.authz import Authorizer
from gateway.sealing import GatewaySealing

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
AUTH = AuthConfig()
ISSUER = AUTH.issuers[0].issuer
GENERATE = ("model:smollm2", "generate")
WAIT_S = 20.0


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    yield log
    log.close()


def audit_records(path: Path, event: str) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def until(predicate: Callable[[], bool], touch: Callable[[], None] | None = None) -> None:
    """Wait for `predicate`, calling `touch` (a write) now and every 2 s in case the watcher was not
    yet listening; fail after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline, next_touch = loop.time() + WAIT_S, loop.time()
    while not predicate():
        assert loop.time() < deadline, "not reached in time"
        if touch is not None and loop.time() >= next_touch:
            touch()
            next_touch = loop.time() + 2
        await asyncio.sleep(0.05)


async def stopped(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Stop a watcher; it must end cleanly, not with an exception."""
    assert not task.done(), f"the watcher died: {task.exception() if task.done() else ''}"
    stop.set()
    await asyncio.wait_for(task, timeout=10)


# --- JWKS -----------------------------------------------------------------------------------------


def jwks_text(kid: str, key: ed25519.Ed25519PrivateKey) -> str:
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    return json.dumps({"keys": [{**jwk, "kid": kid, "alg": "EdDSA", "use": "sig"}]})


def token(kid: str, key: ed25519.Ed25519PrivateKey) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUTH.audience, "sub": "alice", "tenant": "acme", "roles": ["user"],
              "iat": now, "exp": now + 600}  # fmt: skip
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def verifies(verifier: JwtVerifier, bearer: str) -> bool:
    try:
        verifier.verify(bearer)
    except AuthenticationError:
        return False
    return True


async def test_the_jwks_watcher_survives_a_file_that_crashes_the_loader(
    tmp_path: Path, audit: AuditLog
) -> None:
    """A JWKS nested deeply enough makes json raise RecursionError, which `load_jwks` does not turn
    into a rejection: the watch task died and a later rotation was never seen."""
    old_key, new_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "jwks" / "issuer.json"
    path.parent.mkdir()
    path.write_text(jwks_text("k1", old_key))
    verifier = JwtVerifier(AUTH, {ISSUER: path}, lambda _issuer, _tenant: True)
    metrics = Metrics()
    stop = asyncio.Event()
    task = asyncio.create_task(watch_jwks(verifier, metrics, stop, audit))
    try:
        crash = '{"keys": ' + "[" * 100_000 + "]" * 100_000 + "}"
        with pytest.raises(RecursionError):
            json.loads(crash)  # what the loader meets: not a ValueError
        rejected = {"result": "rejected"}
        await until(lambda: sample(metrics, "airlock_jwks_reloads_total", rejected) >= 1,
                    touch=lambda: path.write_text(crash))  # fmt: skip
        assert verifies(verifier, token("k1", old_key))  # the keys in service stay
        assert not task.done(), "the watcher died on the bad file"

        fresh = token("k2", new_key)
        await until(
            lambda: verifies(verifier, fresh), touch=lambda: path.write_text(jwks_text("k2", new_key))
        )
        assert not verifies(verifier, token("k1", old_key))  # the rotation really happened
        assert sample(metrics, "airlock_jwks_reloads_total", {"result": "accepted"}) >= 1
    finally:
        await stopped(task, stop)
    results = {r["result"] for r in audit_records(tmp_path / "audit" / "audit.jsonl", "jwks_reload")}
    assert results == {"rejected", "accepted"}


# --- the policy directory -------------------------------------------------------------------------


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    shutil.copytree(REPO_POLICY, directory, ignore=shutil.ignore_patterns("*.md"))
    return directory


def grant(directory: Path, member: str) -> Callable[[], None]:
    """A write that gives `member` the user role in acme (idempotent, so it can be repeated)."""
    text = (directory / "policy.csv").read_text() + f"g, {member}, user, acme\n"

    def write() -> None:
        (directory / "policy.csv").write_text(text)

    return write


def allowed(authorizer: Authorizer, subject: str) -> bool:
    return authorizer.decide(subject, "acme", *GENERATE).allowed


async def watch(authorizer: Authorizer) -> tuple[asyncio.Task[None], asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(authorizer.watch(stop, debounce_ms=50, check_ms=200))
    await asyncio.sleep(0.3)  # let it start listening (`until` writes again anyway)
    return task, stop


def watch_errors(authorizer: Authorizer) -> float:
    return sample(authorizer.metrics, "airlock_watch_errors_total", {"watcher": "policy"})


async def test_the_policy_watcher_survives_a_reload_that_raises(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception out of a reload (here a RuntimeError, as a loader bug or a failing audit disk
    would raise) ended the watch task: the next edit, a revocation say, was never loaded."""
    authorizer = Authorizer.from_directory(policy_dir, metrics=Metrics())
    real_reload = authorizer.reload
    calls = 0

    async def broken_once() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the reload")
        return await real_reload()

    monkeypatch.setattr(authorizer, "reload", broken_once)
    task, stop = await watch(authorizer)
    try:
        await until(lambda: allowed(authorizer, "acme/zed"), touch=grant(policy_dir, "acme/zed"))
        assert calls >= 2 and watch_errors(authorizer) >= 1
    finally:
        await stopped(task, stop)


async def test_a_reload_that_raises_unexpectedly_is_a_rejection(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, audit: AuditLog
) -> None:
    """Only PolicyError was a rejection; anything else escaped `reload` unlogged and unaudited."""
    authorizer = Authorizer.from_directory(policy_dir, metrics=Metrics(), audit=audit)

    def crash(_directory: Path, _required: tuple[str, ...]) -> Any:
        raise MemoryError("the loader ran out of memory")

    monkeypatch.setattr("gateway.policy.authz.load_checked", crash)
    assert await authorizer.reload() is False
    assert authorizer.generation == 1
    assert sample(authorizer.metrics, "airlock_policy_reloads_total", {"result": "rejected"}) == 1
    [record] = audit_records(tmp_path / "audit" / "audit.jsonl", "policy_reload")
    assert record["result"] == "rejected" and "MemoryError" in record["reason"]


async def test_the_policy_watcher_survives_the_watch_itself_failing(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch can fail to start (inotify's watch limit reached): try again, then reload once."""
    authorizer = Authorizer.from_directory(policy_dir, metrics=Metrics())
    real_awatch = watching.watchfiles.awatch
    starts = 0

    def flaky_awatch(*args: Any, **kwargs: Any) -> Any:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise OSError(28, "OS file watch limit reached")
        return real_awatch(*args, **kwargs)

    monkeypatch.setattr(watching.watchfiles, "awatch", flaky_awatch)
    grant(policy_dir, "acme/zed")()  # written while nobody watches: seen when the watch is back
    task, stop = await watch(authorizer)
    try:
        await until(lambda: allowed(authorizer, "acme/zed"))
        assert watch_errors(authorizer) == 1
        await until(lambda: starts == 2)  # and it watches again
    finally:
        await stopped(task, stop)


async def test_a_watch_that_ends_by_itself_is_started_again(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authorizer = Authorizer.from_directory(policy_dir, metrics=Metrics())
    real_awatch = watching.watchfiles.awatch
    starts = 0

    async def nothing() -> Any:
        return
        yield  # an async generator that ends at once

    def ending_awatch(*args: Any, **kwargs: Any) -> Any:
        nonlocal starts
        starts += 1
        return nothing() if starts <= 2 else real_awatch(*args, **kwargs)

    monkeypatch.setattr(watching.watchfiles, "awatch", ending_awatch)
    task, stop = await watch(authorizer)
    try:
        await until(lambda: allowed(authorizer, "acme/zed"), touch=grant(policy_dir, "acme/zed"))
        await until(lambda: starts == 3)  # watching for real now
        assert watch_errors(authorizer) == 2  # one per ending, with a pause after each: no busy loop
    finally:
        await stopped(task, stop)


async def test_the_policy_watcher_follows_a_directory_that_is_removed_and_comes_back(
    policy_dir: Path,
) -> None:
    """Deploy tools swap a whole directory in. A watch on the removed one hears nothing more: every
    later edit, to the directory that came back, was ignored until a restart."""
    authorizer = Authorizer.from_directory(policy_dir, metrics=Metrics())
    task, stop = await watch(authorizer)
    try:
        aside = policy_dir.with_name("policy.old")
        policy_dir.rename(aside)
        await asyncio.sleep(0.5)  # gone for a while: the watcher notices
        staged = policy_dir.with_name("policy.new")
        shutil.copytree(aside, staged)
        grant(staged, "acme/zed")()
        staged.rename(policy_dir)
        await until(lambda: allowed(authorizer, "acme/zed"))
        shutil.rmtree(aside)
        # And the directory that came back is watched: a later edit there is seen too.
        await until(lambda: allowed(authorizer, "acme/yan"), touch=grant(policy_dir, "acme/yan"))
    finally:
        await stopped(task, stop)


# --- the keystore ---------------------------------------------------------------------------------


class FlakyKeystore:
    """Enough of a keystore for `GatewaySealing.watch`: `reload` raises what it is given, in turn."""

    def __init__(self, outcomes: list[BaseException | bool]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def reload(self) -> bool:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def test_the_keystore_watcher_survives_anything_and_logs_a_failure_once(
    caplog: pytest.LogCaptureFixture, audit: AuditLog
) -> None:
    failure = RuntimeError("keystore half written")
    keystore = FlakyKeystore([failure, failure, failure, KeyError("tenant"), True, False])
    sealing = GatewaySealing(keystore, ca_pem=b"", policy_for=lambda _t: None, audit=audit)  # type: ignore[arg-type]
    errors = 0

    def counted() -> None:
        nonlocal errors
        errors += 1

    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="airlock.sealing"):
        task = asyncio.create_task(sealing.watch(stop, interval=0.01, on_error=counted))
        await until(lambda: keystore.calls >= 6)
        await stopped(task, stop)
    assert errors == 4
    failed = [r for r in caplog.records if "keystore reload failed" in r.getMessage()]
    assert len(failed) == 2  # once per distinct failure, not once a second while it lasts
    assert any("keystore changed" in r.getMessage() for r in caplog.records)
