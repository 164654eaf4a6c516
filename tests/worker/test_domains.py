"""Domain discovery: NVML parsing against a fake `pynvml` module, and the CPU fallback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from worker.isolation.domains import CpuDiscovery, NvmlDiscovery, cuda_visible_devices, format_table


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    uuid: str
    name: str
    memory: int
    mig_mode: int | None = 0  # None: MIG not supported
    migs: tuple[FakeGpu | None, ...] = ()


def fake_nvml(gpus: list[FakeGpu], *, init_fails: bool = False) -> Any:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    def mig_mode(gpu: FakeGpu) -> tuple[int, int]:
        if gpu.mig_mode is None:
            raise NVMLError("Not Supported")
        return gpu.mig_mode, gpu.mig_mode

    def mig_at(gpu: FakeGpu, slot: int) -> FakeGpu:
        mig = gpu.migs[slot]
        if mig is None:
            raise NVMLError("Not Found")
        return mig

    return SimpleNamespace(
        calls=calls,
        NVMLError=NVMLError,
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetUUID=lambda g: g.uuid.encode(),  # older releases answer bytes
        nvmlDeviceGetName=lambda g: g.name,
        nvmlDeviceGetMemoryInfo=lambda g: SimpleNamespace(total=g.memory, free=g.memory, used=0),
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda g: len(g.migs),
        nvmlDeviceGetMigDeviceHandleByIndex=mig_at,
    )


H100 = "NVIDIA H100 80GB HBM3"


def test_whole_gpus_become_gpu_domains_pinned_by_uuid() -> None:
    nvml = fake_nvml(
        [FakeGpu("GPU-aaa", H100, 80 << 30), FakeGpu("GPU-bbb", "NVIDIA L4", 24 << 30, mig_mode=None)]
    )
    found = NvmlDiscovery(nvml).discover()
    assert found.note == ""
    assert [(d.id, d.kind, d.uuids, d.memory_bytes) for d in found.domains] == [
        ("gpu0", "gpu", ("GPU-aaa",), 80 << 30),
        ("gpu1", "gpu", ("GPU-bbb",), 24 << 30),
    ]
    assert cuda_visible_devices(found.domains[0]) == "GPU-aaa"
    assert nvml.calls == ["init", "shutdown"]


def test_mig_mode_gpu_offers_its_instances_not_itself() -> None:
    migs = (
        FakeGpu("MIG-111", f"{H100} MIG 3g.40gb", 40 << 30),
        None,  # an empty slot answers NOT_FOUND
        FakeGpu("MIG-222", f"{H100} MIG 1g.10gb", 10 << 30),
    )
    found = NvmlDiscovery(fake_nvml([FakeGpu("GPU-aaa", H100, 80 << 30, mig_mode=1, migs=migs)])).discover()
    assert [(d.id, d.kind, d.profile, d.parent, d.memory_bytes) for d in found.domains] == [
        ("gpu0-mig0", "mig", "3g.40gb", "GPU-aaa", 40 << 30),
        ("gpu0-mig2", "mig", "1g.10gb", "GPU-aaa", 10 << 30),
    ]
    assert cuda_visible_devices(found.domains[1]) == "MIG-222"
    table = format_table(found)
    assert "MIG-111" in table and "1g.10gb" in table and "GPU-aaa " not in table


def test_nvml_without_driver_falls_back_to_cpu_with_a_reason() -> None:
    found = NvmlDiscovery(fake_nvml([], init_fails=True)).discover()
    assert [d.kind for d in found.domains] == ["cpu"]
    assert "Driver Not Loaded" in found.note and "CPU domain only" in found.note
    assert cuda_visible_devices(found.domains[0]) == ""


def test_mig_mode_without_instances_and_no_gpus_fall_back_to_cpu() -> None:
    empty = FakeGpu("GPU-aaa", H100, 80 << 30, mig_mode=1, migs=(None, None))
    for gpus in ([], [empty]):
        found = NvmlDiscovery(fake_nvml(gpus)).discover()
        assert [d.kind for d in found.domains] == ["cpu"] and "no GPU" in found.note


def test_cpu_domain_reports_host_memory() -> None:
    (cpu,) = CpuDiscovery().discover().domains
    assert cpu.id == "cpu" and cpu.memory_bytes > 1 << 28 and cpu.uuids == ()


def test_airlock_domains_without_nvml_lists_the_cpu_domain() -> None:
    # The dev venv has no nvidia-ml-py: the real import fails and the command says so.
    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("nvidia-ml-py is installed here: `airlock domains` lists what NVML finds instead")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from control.cli import main; sys.exit(main())", "domains"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "\ncpu " in result.stdout
    assert "NVML is not installed" in result.stdout and "CPU domain only" in result.stdout
