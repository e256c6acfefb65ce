"""A test-only NVML backend: fixed readings, and fields that raise like an unsupported NVML query."""

from __future__ import annotations

from dataclasses import dataclass, field

import pynvml

from sftop.engine.gpu import GIB, NvmlUnavailable


def not_supported() -> Exception:
    """What pynvml raises for a field this card, driver or MIG mode does not report."""
    return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total_gib: float | None = 80.0
    used_gib: float = 0.5
    util: tuple[int, int] | None = (0, 0)
    temp: int | None = 35
    power_w: float | None = 70.0
    power_limit_w: float | None = 700.0


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    unavailable: str | None = None
    calls: int = 0

    def start(self) -> None:
        if self.unavailable:
            raise NvmlUnavailable(self.unavailable)

    def _gpu(self, i: int) -> FakeGpu:
        self.calls += 1
        return self.gpus[i]

    def driver_version(self) -> str:
        return "580.65.06"

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, i: int) -> str:
        return self._gpu(i).name

    def uuid(self, i: int) -> str:
        return self._gpu(i).uuid

    def memory(self, i: int) -> tuple[int, int]:
        g = self._gpu(i)
        if g.total_gib is None:
            raise not_supported()
        return int(g.total_gib * GIB), int(g.used_gib * GIB)

    def utilization(self, i: int) -> tuple[int, int]:
        g = self._gpu(i)
        if g.util is None:
            raise not_supported()
        return g.util

    def temperature_c(self, i: int) -> int:
        g = self._gpu(i)
        if g.temp is None:
            raise not_supported()
        return g.temp

    def power_w(self, i: int) -> float:
        g = self._gpu(i)
        if g.power_w is None:
            raise not_supported()
        return g.power_w

    def power_limit_w(self, i: int) -> float:
        g = self._gpu(i)
        if g.power_limit_w is None:
            raise not_supported()
        return g.power_limit_w


def gpu(i: int, total: float, used: float = 0.5, name: str | None = None) -> FakeGpu:
    return FakeGpu(
        name=name or f"NVIDIA Test {total:g}GB",
        uuid=f"GPU-{i:08d}-aaaa-bbbb-cccc-{i:012d}",
        total_gib=total,
        used_gib=used,
    )
