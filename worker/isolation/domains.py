"""Isolation domains: what this host can give a worker (MIG instances, whole GPUs, or the CPU).

Discovery goes through NVML (`nvidia-ml-py`, imported only when asked for); without NVML, or
without a GPU, the host offers one CPU domain and says why. `python -m worker.isolation.domains` (and
`airlock domains`, which runs it) prints what was found.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Literal, Protocol

__all__ = [
    "CpuDiscovery",
    "Discovery",
    "Domain",
    "DomainDiscovery",
    "NvmlDiscovery",
    "cuda_visible_devices",
    "discover",
]

Kind = Literal["cpu", "gpu", "mig"]


@dataclass(frozen=True)
class Domain:
    """One unit a single tenant's worker may own; `uuids` pin it through CUDA_VISIBLE_DEVICES."""

    id: str
    kind: Kind
    name: str
    memory_bytes: int
    uuids: tuple[str, ...] = ()
    parent: str = ""  # a MIG instance's GPU UUID
    profile: str = ""  # a MIG instance's profile, e.g. "1g.10gb"

    @property
    def gpus(self) -> int:
        return len(self.uuids) if self.kind == "gpu" else (1 if self.kind == "mig" else 0)


@dataclass(frozen=True)
class Discovery:
    domains: tuple[Domain, ...]
    note: str = ""  # why discovery fell back, in words an operator can act on


class DomainDiscovery(Protocol):
    def discover(self) -> Discovery: ...


def cuda_visible_devices(domain: Domain) -> str:
    """The CUDA_VISIBLE_DEVICES value that pins a worker to `domain` ("" hides every GPU)."""
    return ",".join(domain.uuids)


class CpuDiscovery:
    def __init__(self, note: str = "") -> None:
        self.note = note

    def discover(self) -> Discovery:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return Discovery((Domain("cpu", "cpu", f"CPU ({os.cpu_count()} cores)", pages),), self.note)


class NvmlDiscovery:
    """GPUs and their MIG instances through NVML. `nvml` is the `pynvml` module (tests pass a fake)."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml

    def discover(self) -> Discovery:
        nvml = self._nvml
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                return CpuDiscovery(
                    "NVML is not installed (pip install 'airlock[gpu]' for nvidia-ml-py): CPU domain only"
                ).discover()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return CpuDiscovery(f"NVML could not start ({exc}): no NVIDIA driver? CPU domain only").discover()
        try:
            domains = [d for i in range(nvml.nvmlDeviceGetCount()) for d in self._device(nvml, i)]
        finally:
            nvml.nvmlShutdown()
        if not domains:
            note = "NVML found no GPU (or no MIG instance in MIG mode): CPU domain only"
            return CpuDiscovery(note).discover()
        return Discovery(tuple(domains))

    def _device(self, nvml: Any, index: int) -> list[Domain]:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        name = _text(nvml.nvmlDeviceGetName(handle))
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # GPUs without MIG support answer "not supported"
            current = 0
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            return [Domain(f"gpu{index}", "gpu", name, total, (uuid,))]
        # In MIG mode the whole GPU is not a domain: only its instances are (a worker on the parent
        # would see no memory). Empty slots answer NOT_FOUND.
        out = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:
                continue
            mig_name = _text(nvml.nvmlDeviceGetName(mig))
            out.append(
                Domain(
                    id=f"gpu{index}-mig{slot}",
                    kind="mig",
                    name=mig_name,
                    memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(mig).total),
                    uuids=(_text(nvml.nvmlDeviceGetUUID(mig)),),
                    parent=uuid,
                    profile=_profile(mig_name),
                )
            )
        return out


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def _profile(name: str) -> str:
    """'NVIDIA H100 80GB HBM3 MIG 1g.10gb' -> '1g.10gb' (NVML names MIG devices this way)."""
    _head, sep, tail = name.rpartition(" MIG ")
    return tail.strip() if sep else ""


def discover(discovery: DomainDiscovery | None = None) -> Discovery:
    return (discovery or NvmlDiscovery()).discover()


def format_table(found: Discovery) -> str:
    lines = [f"{'domain':<14} {'kind':<4} {'memory':>10}  {'profile':<9} {'CUDA_VISIBLE_DEVICES':<44} name"]
    for d in found.domains:
        pin = cuda_visible_devices(d) or '""'
        memory = f"{d.memory_bytes / 2**30:>7.1f} GiB"
        lines.append(f"{d.id:<14} {d.kind:<4} {memory}  {d.profile or '-':<9} {pin:<44} {d.name}")
    if found.note:
        lines.append(f"note: {found.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="airlock domains", description="List this host's isolation domains.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    found = discover()
    if a.json:
        print(json.dumps({"domains": [asdict(d) for d in found.domains], "note": found.note}, indent=2))
    else:
        print(format_table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
