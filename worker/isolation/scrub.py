"""The domain scrubber: overwrite a domain's memory after its worker exited, then verify it.

    python -m worker.isolation.scrub --arena /dev/shm/... --canaries run/w.canaries.json   (CPU domain)
    python -m worker.isolation.scrub --device cuda --canaries run/w.canaries.json          (GPU/MIG)

It prints one JSON line (bytes scrubbed, GB/s, canaries seen before, canary hits after, verified)
and exits 0 only when verification passed: every byte is zero and no canary of the previous
worker (recorded by hash at its start) is found. The launcher hands the domain to a new worker
only after that; any other exit keeps the domain out of service.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.isolation.arena import CANARY_BYTES, CanaryRecord

__all__ = ["ScrubResult", "scrub_all_cuda", "scrub_arena", "scrub_cuda"]

CHUNK = 16 << 20


@dataclass(frozen=True)
class ScrubResult:
    verified: bool
    bytes: int
    seconds: float  # overwrite plus the read-back verification
    canaries_before: int  # canaries found before overwriting (-1: not looked for)
    canary_hits: int  # canaries found after overwriting: must be 0
    nonzero_bytes: int  # bytes not zero after overwriting: must be 0
    reason: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gbps": round(self.gbps, 3)}


def _hits(window: bytes | memoryview, hashes: frozenset[str]) -> int:
    """Canaries in `window`, scanning only its non-zero pages (zero pages can't be a canary)."""
    hits = 0
    view = memoryview(window)
    zero = bytes(CANARY_BYTES)
    for off in range(0, len(view) - CANARY_BYTES + 1, CANARY_BYTES):
        page = view[off : off + CANARY_BYTES]
        if page != zero and hashlib.sha256(page).hexdigest() in hashes:
            hits += 1
    return hits


def scrub_arena(arena: Path, record: CanaryRecord | None) -> ScrubResult:
    """Overwrite the whole arena with zeros, then check every byte and look for the canaries."""
    import numpy as np

    if not arena.exists():
        if record is not None:  # the worker wrote canaries there: the evidence is gone
            return ScrubResult(False, 0, 0.0, -1, 0, 0, "the arena the worker recorded is missing")
        return ScrubResult(True, 0, 0.0, 0, 0, 0, "no arena: the domain was never used")
    size = arena.stat().st_size
    if record is not None and record.arena_bytes != size:
        # The evidence is gone or altered (truncated, replaced): nothing can be verified.
        return ScrubResult(False, 0, 0.0, -1, 0, 0,
                           f"arena is {size} bytes, the worker recorded {record.arena_bytes}")  # fmt: skip
    if size == 0:
        return ScrubResult(True, 0, 0.0, 0, 0, 0, "empty arena")
    hashes = frozenset(record.hashes) if record else frozenset()
    fd = os.open(arena, os.O_RDWR | os.O_NOFOLLOW)
    try:
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    with mem:
        # Evidence the check below can fail: the canaries are where the worker put them.
        offsets = record.offsets if record else ()
        before = sum(_hits(mem[o : o + CANARY_BYTES], hashes) for o in offsets if o + CANARY_BYTES <= size)
        words = np.frombuffer(mem, dtype=np.uint8)
        start = time.perf_counter()
        words.fill(0)  # memset
        nonzero = hits = 0
        for a in range(0, size, CHUNK):
            if words[a : a + CHUNK].max() != 0:  # one vectorised pass reads every byte back
                nonzero += int(np.count_nonzero(words[a : a + CHUNK]))
                hits += _hits(words[a : a + CHUNK].tobytes(), hashes)
        seconds = time.perf_counter() - start
        del words  # the mapping can't close while numpy views of it are alive
    ok = nonzero == 0 and hits == 0
    reason = "" if ok else f"{nonzero} byte(s) not zero, {hits} canary hit(s) after overwrite"
    return ScrubResult(ok, size, seconds, before, hits, nonzero, reason)


def scrub_cuda(record: CanaryRecord | None, device: str = "cuda", chunk: int = 2 << 30) -> ScrubResult:
    """Allocate the device's free memory in chunks, zero it, and verify it reads back zero.

    Pages a dead process held go back to the driver; allocating all free memory is how a new
    process gets them. Non-zero pages left after zero_ (there should be none) are copied to the
    host and hashed against the canary record.
    """
    import torch

    hashes = frozenset(record.hashes) if record else frozenset()
    held: list[Any] = []
    free, _total = torch.cuda.mem_get_info(device)
    headroom = 256 << 20  # cuBLAS workspaces and the allocator's own needs
    start = time.perf_counter()
    remaining = max(0, free - headroom)
    while remaining >= CANARY_BYTES:
        size = min(chunk, remaining) // CANARY_BYTES * CANARY_BYTES
        try:
            block = torch.empty(size, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            chunk //= 2
            if chunk < (1 << 20):
                break
            continue
        block.zero_()
        held.append(block)
        remaining -= size
    scrubbed = sum(int(b.numel()) for b in held)
    nonzero = hits = 0
    for block in held:
        # The largest unsigned byte is 0 only when every byte is: a reduction needs no block-sized
        # temporary, and the scrub has left no room for one (count_nonzero ran out of memory on an H200).
        if int(block.max().item()) != 0:
            n, h = _dirty_pages(block, hashes)
            nonzero, hits = nonzero + n, hits + h
    seconds = time.perf_counter() - start
    del held
    torch.cuda.empty_cache()
    ok = nonzero == 0 and hits == 0 and scrubbed > 0
    reason = "" if ok else f"{nonzero} byte(s) not zero, {hits} canary hit(s), {scrubbed} bytes scrubbed"
    return ScrubResult(ok, scrubbed, seconds, -1, hits, nonzero, reason)


def _dirty_pages(block: Any, hashes: frozenset[str], batch: int = 256) -> tuple[int, int]:
    """Non-zero bytes and canary hits of a GPU block that did not read back zero, copied to the
    host a few pages at a time (device memory is nearly all held by the scrub)."""
    import numpy as np

    pages = block.view(-1, CANARY_BYTES)
    dirty = pages.amax(dim=1).nonzero().flatten()
    nonzero = hits = 0
    for first in range(0, int(dirty.numel()), batch):
        host = pages.index_select(0, dirty[first : first + batch]).cpu().numpy()
        nonzero += int(np.count_nonzero(host))
        hits += _hits(host.tobytes(), hashes)
    return nonzero, hits


def scrub_all_cuda(record: CanaryRecord | None) -> ScrubResult:
    """Scrub every GPU this process sees (the domain's, through CUDA_VISIBLE_DEVICES); all must verify."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        reason = "no CUDA device visible: the GPU domain can't be scrubbed"
        return ScrubResult(False, 0, 0.0, -1, 0, 0, reason)
    parts = [scrub_cuda(record, f"cuda:{i}") for i in range(count)]
    failed = [f"cuda:{i}: {p.reason}" for i, p in enumerate(parts) if not p.verified]
    return ScrubResult(
        verified=not failed,
        bytes=sum(p.bytes for p in parts),
        seconds=sum(p.seconds for p in parts),
        canaries_before=-1,
        canary_hits=sum(p.canary_hits for p in parts),
        nonzero_bytes=sum(p.nonzero_bytes for p in parts),
        reason="; ".join(failed),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.isolation.scrub", description=__doc__)
    p.add_argument("--arena", type=Path, help="the CPU domain's arena file")
    p.add_argument("--canaries", type=Path, help="the previous worker's canary record")
    p.add_argument("--device", default="cpu", help="'cpu' (the arena) or 'cuda' (every visible GPU)")
    a = p.parse_args(argv)
    record = None
    if a.canaries is not None and a.canaries.exists():
        try:
            record = CanaryRecord.load(a.canaries)
        except (OSError, ValueError, KeyError) as exc:
            print(json.dumps({"verified": False, "reason": f"unreadable canary record: {exc}"}))
            return 3
    try:
        if a.device == "cpu":
            if a.arena is None:
                p.error("--arena is required for the CPU domain")
            result = scrub_arena(a.arena, record)
        else:
            result = scrub_all_cuda(record)
    except Exception as exc:  # any failure means "not verified", and must say so, not crash silently
        print(json.dumps({"verified": False, "reason": f"scrub failed: {type(exc).__name__}: {exc}"}))
        return 3
    if result.verified and a.canaries is not None:
        a.canaries.unlink(missing_ok=True)  # spent: the next worker records its own
    print(json.dumps(result.as_dict()), flush=True)
    return 0 if result.verified else 3


if __name__ == "__main__":
    sys.exit(main())
