import time

import pytest

from sftop.engine.gpu import GpuInfo, GpuStatus
from sftop.tui.services import Services
from tui_fixtures import T0

GIB = 2**30


def fixed_gpu() -> GpuStatus:
    return GpuStatus(
        gpus=[
            GpuInfo(
                index=0,
                nvml_index=0,
                name="NVIDIA H100 80GB HBM3",
                uuid="GPU-0",
                memory_total_bytes=80 * GIB,
                memory_used_bytes=20 * GIB,
                memory_free_bytes=60 * GIB,
                utilization_pct=97,
                temperature_c=61,
            )
        ],
        driver_version="550.54",
    )


@pytest.fixture(autouse=True)
def sftop_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield tmp_path / "home"
    time.tzset()


@pytest.fixture
def services(tmp_path):
    """Deterministic: a fixed H100 reading, a clock stopped just after the recorded runs, an empty HF cache."""
    return Services(
        gpu_reader=fixed_gpu,
        clock=lambda: T0 + 120.0,
        gpu_interval=0.2,
        poll_interval=0.05,
        redraw_interval=0.1,
        hf_cache_dir=str(tmp_path / "empty-hf-cache"),
    )


@pytest.fixture
def no_gpu_services(tmp_path):
    return Services(
        gpu_reader=lambda: GpuStatus(gpus=[], reason="NVML not found: no NVIDIA driver is installed"),
        clock=lambda: T0 + 120.0,
        gpu_interval=0.2,
        poll_interval=0.05,
        redraw_interval=0.1,
        hf_cache_dir=str(tmp_path / "empty-hf-cache"),
    )
