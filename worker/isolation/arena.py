"""A CPU domain's memory arena: engine state buffers and canaries in a file-backed shared mapping.

Anonymous memory of a dead process is unreachable and the kernel zeroes it before reuse, so a CPU
scrub of it would prove nothing. The arena (a file in /dev/shm) is memory that outlives the worker
on purpose: the worker keeps per-request state buffers and its start-up canaries there, and the
scrubber, a separate process, overwrites and verifies exactly that memory after the worker is gone.
On CUDA the canaries live in device memory instead (`write_cuda_canaries`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import mmap
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CANARY_BYTES", "SCRUB_MODES", "Arena", "CanaryRecord", "RequestState", "StateSlot"]

SCRUB_MODES = ("request", "tenant-switch", "off")

CANARY_BYTES = 4096  # one page; canaries sit at page-aligned offsets so a scan can find them


@dataclass(frozen=True)
class CanaryRecord:
    """What the scrubber checks against: sha256 of each canary, never the canaries themselves.

    `offsets` (CPU arena only) let the scrubber confirm the canaries were there before it
    overwrote them, without hashing the whole arena; after the overwrite it checks every byte.
    """

    arena_bytes: int
    canary_bytes: int
    hashes: tuple[str, ...]
    offsets: tuple[int, ...] = ()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"arena_bytes": self.arena_bytes, "canary_bytes": self.canary_bytes,
                       "hashes": list(self.hashes), "offsets": list(self.offsets)}, fh)  # fmt: skip
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CanaryRecord:
        raw = json.loads(path.read_text())
        offsets = tuple(int(o) for o in raw.get("offsets", ()))
        return cls(int(raw["arena_bytes"]), int(raw["canary_bytes"]), tuple(raw["hashes"]), offsets)


def new_canaries(count: int) -> list[bytes]:
    return [secrets.token_bytes(CANARY_BYTES) for _ in range(count)]


def record_for(canaries: list[bytes], arena_bytes: int, offsets: tuple[int, ...] = ()) -> CanaryRecord:
    hashes = tuple(hashlib.sha256(c).hexdigest() for c in canaries)
    return CanaryRecord(arena_bytes, CANARY_BYTES, hashes, offsets)


@dataclass
class StateSlot:
    offset: int
    size: int
    used: int = 0


class Arena:
    """`size` bytes of /dev/shm-backed memory: canaries first, then fixed-size request state slots."""

    def __init__(self, path: Path, size: int, *, canaries: int = 16, slot_bytes: int = 64 << 10) -> None:
        if size < (canaries + 1) * CANARY_BYTES + slot_bytes:
            raise ValueError(f"arena of {size} bytes is too small")
        self.path = path
        self.size = size
        # /dev/shm is shared by every user: never follow a planted link, never use someone else's file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise PermissionError(f"{path} belongs to another user")
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._canary_count = canaries
        start = canaries * CANARY_BYTES
        self._free = [StateSlot(off, slot_bytes) for off in range(start, size - slot_bytes + 1, slot_bytes)]
        self._dirty: list[StateSlot] = []

    def write_canaries(self, record_path: Path) -> CanaryRecord:
        """Write fresh random canaries; record only their hashes (the scrubber must not find them)."""
        canaries = new_canaries(self._canary_count)
        offsets = tuple(i * CANARY_BYTES for i in range(len(canaries)))
        for offset, canary in zip(offsets, canaries, strict=True):
            self._map[offset : offset + CANARY_BYTES] = canary
        record = record_for(canaries, self.size, offsets)
        record.save(record_path)
        return record

    def acquire(self, data: bytes) -> StateSlot | None:
        """Hold `data` (a request's state) in a slot; None when the arena is full or it doesn't fit."""
        if not self._free or len(data) > self._free[0].size:
            return None
        slot = self._free.pop()
        self._map[slot.offset : slot.offset + len(data)] = data
        slot.used = len(data)
        return slot

    def release(self, slot: StateSlot, *, zero: bool) -> None:
        """Give a slot back; zero it now, or leave it dirty until `zero_dirty` (on tenant switch)."""
        if zero:
            self._zero(slot)
            self._free.append(slot)
        else:
            self._dirty.append(slot)

    def zero_dirty(self) -> int:
        n = 0
        while self._dirty:
            slot = self._dirty.pop()
            n += slot.used
            self._zero(slot)
            self._free.append(slot)
        return n

    def _zero(self, slot: StateSlot) -> None:
        self._map[slot.offset : slot.offset + slot.used] = bytes(slot.used)
        slot.used = 0

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


class RequestState:
    """Holds each request's state in the arena while it runs; zeroes it per `mode`.

    "request": zeroed when the request ends; "tenant-switch": zeroed before a request of another
    tenant starts, or at once when it ends while another tenant's request runs (a dedicated worker
    only ever serves one tenant, so that is at exit, by the scrubber; a shared worker serves
    several, concurrently); "off": left for the scrubber.
    """

    def __init__(self, arena: Arena, mode: str) -> None:
        if mode not in SCRUB_MODES:
            raise ValueError(f"scrub mode must be one of {', '.join(SCRUB_MODES)}")
        self.arena = arena
        self.mode = mode
        self.zeroed_bytes = 0
        self._dirty_tenants: set[str] = set()  # whose released state lies unzeroed
        self._running: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, tenant: str, data: bytes) -> Iterator[None]:
        if self.mode == "tenant-switch" and self._dirty_tenants - {tenant}:
            self.zeroed_bytes += self.arena.zero_dirty()
            self._dirty_tenants.clear()
        slot = self.arena.acquire(data)
        self._running[tenant] += 1
        try:
            yield
        finally:
            self._running[tenant] -= 1
            if slot is not None:
                used = slot.used
                others = any(n for t, n in self._running.items() if t != tenant)
                zero = self.mode == "request" or (self.mode == "tenant-switch" and others)
                self.arena.release(slot, zero=zero)
                self.zeroed_bytes += used if zero else 0
                if not zero:
                    self._dirty_tenants.add(tenant)


def write_cuda_canaries(count: int, record_path: Path) -> list[Any]:
    """Put canaries in every visible GPU's memory, kept allocated for the worker's life.

    A domain may be a group of GPUs: each gets `count` canaries. The scrubber later allocates each
    device's free memory and must not find any of them. Returns the tensors (keep them referenced).
    """
    import torch

    canaries, tensors, total = [], [], 0
    for index in range(torch.cuda.device_count()):
        mine = new_canaries(count)
        host = torch.frombuffer(bytearray(b"".join(mine)), dtype=torch.uint8)
        tensors.append(host.to(f"cuda:{index}"))
        total += int(torch.cuda.mem_get_info(index)[1])
        canaries += mine
    record_for(canaries, total).save(record_path)
    return tensors
