"""Memory scrubbing: the CPU arena, per-request zeroing, the scrubber, and a real worker's canaries."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.pki import ensure_dev_pki, worker_attestation_cert
from serving.settings import DomainSettings, TenantIdentity, TlsFiles, WorkerSettings
from worker.isolation.arena import CANARY_BYTES, Arena, CanaryRecord, RequestState
from worker.isolation.scrub import scrub_arena, scrub_cuda

SECRET = b"patient 4711: diagnosis text that must not outlive its request"


def found(arena: Path, needle: bytes) -> bool:
    return needle in arena.read_bytes()


def canaries_in(arena: Path, record: CanaryRecord) -> int:
    data, hashes = arena.read_bytes(), set(record.hashes)
    return sum(
        hashlib.sha256(data[i : i + CANARY_BYTES]).hexdigest() in hashes
        for i in range(0, len(data), CANARY_BYTES)
    )


def test_request_mode_zeroes_state_when_the_request_ends(tmp_path: Path) -> None:
    arena = Arena(tmp_path / "a.arena", 1 << 20)
    state = RequestState(arena, "request")
    with state.hold("acme", SECRET):
        assert found(arena.path, SECRET)  # the state really sits in the arena while in use
    assert not found(arena.path, SECRET) and state.zeroed_bytes == len(SECRET)


def test_tenant_switch_mode_zeroes_before_another_tenant_runs(tmp_path: Path) -> None:
    arena = Arena(tmp_path / "a.arena", 1 << 20)
    state = RequestState(arena, "tenant-switch")
    with state.hold("acme", SECRET):
        pass
    with state.hold("acme", b"second request"):
        assert found(arena.path, SECRET)  # same tenant: kept (until exit and the scrubber)
    with state.hold("globex", b"other tenant"):
        assert not found(arena.path, SECRET) and not found(arena.path, b"second request")


def test_tenant_switch_on_a_shared_worker_zeroes_state_across_concurrent_tenants(tmp_path: Path) -> None:
    """Requests of two tenants overlap: acme's state may not wait, dirty, while globex's run."""
    arena = Arena(tmp_path / "a.arena", 1 << 20)
    state = RequestState(arena, "tenant-switch")
    with state.hold("globex", b"globex state"):
        with state.hold("acme", SECRET):
            assert found(arena.path, SECRET)
        assert not found(arena.path, SECRET)  # ended while globex runs: zeroed at once
    assert found(arena.path, b"globex state")  # nobody else running: dirty until a switch
    with state.hold("globex", b"globex again"):
        assert found(arena.path, b"globex state")
    with state.hold("acme", b"acme again"):
        assert not found(arena.path, b"globex state") and not found(arena.path, b"globex again")


def test_scrub_finds_canaries_then_overwrites_and_verifies(tmp_path: Path) -> None:
    arena = Arena(tmp_path / "a.arena", 1 << 20)
    record = arena.write_canaries(tmp_path / "c.json")
    with RequestState(arena, "off").hold("acme", SECRET):
        pass
    arena.close()
    assert canaries_in(arena.path, record) == 16 and found(arena.path, SECRET)
    result = scrub_arena(arena.path, CanaryRecord.load(tmp_path / "c.json"))
    assert result.verified and result.bytes == 1 << 20
    assert (result.canaries_before, result.canary_hits, result.nonzero_bytes) == (16, 0, 0)
    assert canaries_in(arena.path, record) == 0 and not found(arena.path, SECRET)
    assert arena.path.read_bytes() == bytes(1 << 20)


def test_scrub_refuses_to_verify_a_truncated_or_missing_arena(tmp_path: Path) -> None:
    arena = Arena(tmp_path / "a.arena", 1 << 20)
    record = arena.write_canaries(tmp_path / "c.json")
    arena.close()
    os.truncate(arena.path, 8192)
    result = scrub_arena(arena.path, record)
    assert not result.verified and "recorded 1048576" in result.reason
    arena.path.unlink()
    assert not scrub_arena(arena.path, record).verified
    assert scrub_arena(arena.path, None).verified  # never used: nothing to scrub


def test_a_killed_worker_leaves_canaries_that_the_scrubber_removes(state_dir: Path, tmp_path: Path) -> None:
    """A real worker process writes canaries, is SIGKILLed, the scrubber runs, the canaries are gone."""
    pki = ensure_dev_pki(state_dir)
    attest = worker_attestation_cert(pki, "acme")
    arena, record, ready = tmp_path / "w.arena", tmp_path / "w.canaries.json", tmp_path / "w.ready"
    settings = tmp_path / "w.settings.json"
    WorkerSettings(
        (TenantIdentity("acme", attest.cert, attest.key),), "echo",
        TlsFiles(pki.worker_cert, pki.worker_key, pki.ca_cert), tmp_path, engine="echo",
        domain=DomainSettings(arena=arena, arena_bytes=2 << 20, canary_file=record),
    ).write(settings)  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "--settings", str(settings), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while not ready.exists():
            assert worker.poll() is None and time.monotonic() < end, "worker did not start"
            time.sleep(0.05)
        recorded = CanaryRecord.load(record)
        assert canaries_in(arena, recorded) == 16
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert canaries_in(arena, recorded) == 16  # the dead worker's memory still holds them
    done = subprocess.run(
        [sys.executable, "-m", "worker.isolation.scrub", "--arena", str(arena), "--canaries", str(record)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["verified"] and result["canaries_before"] == 16 and result["canary_hits"] == 0
    assert canaries_in(arena, recorded) == 0
    assert not record.exists()  # spent; the next worker records its own


def _needs_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the CUDA scrub (allocate free memory, zero_, verify) needs a GPU")


def test_cuda_scrub_needs_a_gpu() -> None:
    _needs_cuda()
    result = scrub_cuda(None)
    assert result.verified and result.bytes > 0 and result.nonzero_bytes == 0


def test_cuda_scrub_after_a_killed_process_that_held_canaries(tmp_path: Path) -> None:
    """A process puts canaries in GPU memory and is SIGKILLed; the supervisor's scrub command verifies."""
    _needs_cuda()
    record = tmp_path / "w.canaries.cuda.json"
    code = (
        "import os, signal, sys, torch\nfrom pathlib import Path\n"
        "from worker.isolation.arena import write_cuda_canaries\n"
        "held = write_cuda_canaries(16, Path(sys.argv[1]))\ntorch.cuda.synchronize()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    dead = subprocess.run([sys.executable, "-c", code, str(record)], timeout=120, check=False)
    assert dead.returncode == -signal.SIGKILL and record.exists()
    done = subprocess.run(
        [sys.executable, "-m", "worker.isolation.scrub", "--device", "cuda", "--canaries", str(record)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["verified"] and result["canary_hits"] == 0 and result["bytes"] > 0
    assert not record.exists()


def test_a_gpu_block_that_reads_back_dirty_is_counted_and_its_canaries_found() -> None:
    """The verification path for a block that did not zero, on a CPU tensor (same torch operations)."""
    torch = pytest.importorskip("torch")
    from worker.isolation.arena import new_canaries
    from worker.isolation.scrub import _dirty_pages

    canary = new_canaries(1)[0]
    block = torch.zeros(64 * CANARY_BYTES, dtype=torch.uint8)
    block[5 * CANARY_BYTES : 6 * CANARY_BYTES] = torch.frombuffer(bytearray(canary), dtype=torch.uint8)
    block[40 * CANARY_BYTES + 7] = 1
    nonzero, hits = _dirty_pages(block, frozenset({hashlib.sha256(canary).hexdigest()}), batch=1)
    assert hits == 1 and nonzero == sum(b != 0 for b in canary) + 1


def test_arena_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "a.arena").symlink_to(target)
    with pytest.raises(OSError):
        Arena(tmp_path / "a.arena", 1 << 20)
    assert target.read_bytes() == b""
