from __future__ import annotations

import pytest
from _fake_nvml import FakeGpu, FakeNvml, gpu

from sftop.engine.gpu import GIB, PynvmlBackend, read_gpus, sample_gpus, visible_nvml_indices


def test_reads_every_field_and_free_is_total_minus_used():
    backend = FakeNvml([FakeGpu(total_gib=80.0, used_gib=12.5, util=(37, 11), temp=51, power_w=310.5)])
    status = read_gpus(backend, env={})
    assert status.ok and status.reason is None
    assert status.driver_version == "580.65.06"
    (g,) = status.gpus
    assert (g.index, g.nvml_index, g.device) == (0, 0, "cuda:0")
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.memory_total_bytes == 80 * GIB
    assert g.memory_used_bytes == int(12.5 * GIB)
    assert g.free_gib == pytest.approx(67.5)
    assert (g.utilization_pct, g.memory_utilization_pct, g.temperature_c) == (37, 11, 51)
    assert g.power_w == 310.5 and g.power_limit_w == 700.0
    # doctor's short names
    assert g.memory_total == g.memory_total_bytes and g.memory_used == g.memory_used_bytes
    assert "67.5 of 80.0 GiB free" in g.one_line()


def test_unsupported_fields_are_none_not_errors():
    backend = FakeNvml([FakeGpu(util=None, temp=None, power_w=None, power_limit_w=None)])
    (g,) = read_gpus(backend, env={}).gpus
    assert g.utilization_pct is None and g.temperature_c is None and g.power_w is None
    assert "N/A" in g.one_line()
    assert g.to_dict()["power_w"] is None


def test_memory_unsupported_leaves_free_unknown_and_best_skips_it():
    backend = FakeNvml([FakeGpu(total_gib=None), gpu(1, 24.0)])
    status = read_gpus(backend, env={})
    assert status.gpus[0].memory_free_bytes is None
    assert status.best().index == 1


def test_no_driver_gives_reason_with_hint():
    status = read_gpus(FakeNvml(unavailable="NVIDIA driver not found (libnvidia-ml.so): install it"), env={})
    assert status.gpus == [] and not status.ok
    assert "driver not found" in status.reason
    assert status.best() is None
    assert status.summary().startswith("No GPU:")


def test_real_backend_on_a_machine_without_driver_does_not_raise(monkeypatch):
    import pynvml

    def no_lib():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_lib)
    monkeypatch.setattr(PynvmlBackend, "_started", False)
    status = read_gpus(PynvmlBackend(), env={})
    assert status.gpus == []
    assert status.reason.startswith("NVIDIA driver not found (libnvidia-ml.so)")
    assert "plan for the CPU" in status.reason
    assert sample_gpus(PynvmlBackend(), env={}) == []


def test_driver_without_gpus():
    status = read_gpus(FakeNvml([]), env={})
    assert status.gpus == [] and "sees no GPU" in status.reason


def test_other_process_holding_memory_counts_against_free():
    status = read_gpus(FakeNvml([gpu(0, 24.0, used=20.0)]), env={})
    assert status.gpus[0].free_gib == pytest.approx(4.0)


def test_best_is_the_gpu_with_most_free_memory():
    backend = FakeNvml([gpu(0, 80.0, used=70.0), gpu(1, 48.0, used=1.0), gpu(2, 48.0, used=1.0)])
    status = read_gpus(backend, env={})
    assert status.best().index == 1  # ties go to the lower index


UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]


@pytest.mark.parametrize(
    "env, expected",
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        ("1", [1]),
        ("GPU-cccc3333-0000", [2]),
        ("gpu-BBBB2222", [1]),  # case-insensitive unique prefix
        ("cccc3333,0", [2, 0]),  # UUID without the GPU- prefix
        ("0,7,1", [0]),  # CUDA stops at the first invalid entry
        ("-1", []),
        ("", []),
        ("MIG-1234,0", []),
        ("0,0", [0]),
    ],
)
def test_cuda_visible_devices_mapping(env, expected):
    indices, note = visible_nvml_indices(env, UUIDS)
    assert indices == expected
    assert (note is None) == (env is None or env in ("2,0", "1", "GPU-cccc3333-0000", "gpu-BBBB2222", "cccc3333,0"))


def test_ambiguous_uuid_prefix_is_rejected():
    indices, note = visible_nvml_indices("GPU-", UUIDS)
    assert indices == [] and "more than one" in note


def test_read_gpus_renumbers_by_cuda_visible_devices():
    backend = FakeNvml([gpu(0, 80.0), gpu(1, 24.0), gpu(2, 48.0)])
    uuid2 = backend.gpus[2].uuid
    status = read_gpus(backend, env={"CUDA_VISIBLE_DEVICES": f"{uuid2},1"})
    assert [(g.index, g.nvml_index) for g in status.gpus] == [(0, 2), (1, 1)]
    assert [g.device for g in status.gpus] == ["cuda:0", "cuda:1"]
    assert status.best().nvml_index == 2
    assert status.cuda_visible_devices == f"{uuid2},1"


def test_everything_hidden_says_why():
    status = read_gpus(FakeNvml([gpu(0, 80.0)]), env={"CUDA_VISIBLE_DEVICES": ""})
    assert status.gpus == [] and "empty" in status.reason


def test_sampler_is_cheap_and_follows_visibility():
    backend = FakeNvml([gpu(0, 80.0, used=10.0), gpu(1, 24.0, used=3.0)])
    backend.gpus[1].util = (90, 40)
    samples = sample_gpus(backend, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert len(samples) == 1
    s = samples[0]
    assert s.index == 0
    assert s.memory_used_gib == pytest.approx(3.0) and s.memory_total_gib == pytest.approx(24.0)
    assert s.utilization_pct == 90 and s.temperature_c == 35 and s.power_w == 70.0
    assert set(s.to_dict()) == {
        "index",
        "memory_used_gib",
        "memory_total_gib",
        "utilization_pct",
        "temperature_c",
        "power_w",
    }


def test_sampler_survives_unsupported_fields():
    backend = FakeNvml([FakeGpu(total_gib=None, util=None, temp=None, power_w=None)])
    (s,) = sample_gpus(backend, env={})
    assert s.memory_used_gib is None and s.utilization_pct is None and s.power_w is None


def test_import_does_not_touch_nvml():
    import subprocess
    import sys

    code = "import sys, sftop.engine.gpu, sftop.engine.planner; assert 'pynvml' not in sys.modules, 'loaded eagerly'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_bug_in_a_reading_is_not_taken_for_an_unsupported_field():
    # only NVML's own errors mean "this card does not report it"; anything else is a bug to see
    class Broken(FakeNvml):
        def temperature_c(self, i: int) -> int:
            raise TypeError("a bug in the reader")

    with pytest.raises(TypeError, match="a bug in the reader"):
        read_gpus(Broken(gpus=[FakeGpu()]), env={})
