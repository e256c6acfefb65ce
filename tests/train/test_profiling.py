"""The profiler window a benchmark asks for through the environment (sftop/engine/train/profiling.py)."""

import json

import pytest

from sftop.engine.train import profiling
from train_helpers import fast_preset, prepared_run


def test_window_from_the_environment():
    assert profiling.requested_window({}) is None
    assert profiling.requested_window({profiling.STEPS_ENV: "20:4"}) == (20, 4)
    for bad in ("20", "a:b", "0:3", "2:0"):
        with pytest.raises(ValueError, match=profiling.STEPS_ENV):
            profiling.requested_window({profiling.STEPS_ENV: bad})


def test_busy_time_is_the_union_of_device_intervals():
    assert profiling.busy_ns([]) == 0
    assert profiling.busy_ns([(0, 10), (5, 12), (20, 25), (21, 22)]) == 12 + 5


def test_syncs_are_counted_per_step_with_what_made_them():
    # name, on device, start, end, thread: two steps; one read-back per step, a kernel of 3 ms each
    events = [
        ("aten::item", False, 100, 400, 1),
        ("aten::_local_scalar_dense", False, 150, 390, 1),
        ("cudaStreamSynchronize", False, 200, 380, 1),
        ("aten::item", False, 1_000, 1_400, 1),
        ("aten::_local_scalar_dense", False, 1_100, 1_390, 1),
        ("cudaStreamSynchronize", False, 1_200, 1_380, 1),
        ("cudaLaunchKernel", False, 50, 60, 1),
        ("gemm", True, 0, 3_000_000, 7),
        ("gemm", True, 4_000_000, 7_000_000, 7),
        ("Memcpy HtoD (Pageable -> Device)", True, 3_500_000, 3_500_100, 7),
        ("Memcpy HtoD (Pinned -> Device)", True, 3_600_000, 3_600_100, 7),
        ("Memcpy HtoD (Pinned -> Device)", True, 3_700_000, 3_700_100, 7),
    ]
    summary = profiling.summarise(events, steps=2, wall_s=0.01)
    assert summary["host_syncs_per_step"] == 1
    assert summary["host_syncs_by_cause"] == {"cudaStreamSynchronize in aten::item": 1}
    assert summary["gpu_busy_ms_per_step"] == 3.0 and summary["gpu_busy_share"] == 0.6
    assert summary["top_gpu_kernels"][0] == ["gemm", 3.0]
    assert summary["copies_per_step"] == {"Memcpy HtoD (Pinned -> Device)": 1, "Memcpy HtoD (Pageable -> Device)": 0.5}


def test_a_run_writes_its_profile_window(home, tmp_path, monkeypatch):
    out = tmp_path / "profile"
    monkeypatch.setenv(profiling.STEPS_ENV, "2:2")
    monkeypatch.setenv(profiling.DIR_ENV, str(out))
    run, writer = prepared_run(fast_preset("train.max_steps=4", "train.save_steps=100"), tmp_path / "run")
    trainer = run.build_trainer()
    trainer.train()
    writer.close()
    summary = json.loads((out / profiling.SUMMARY).read_text())
    assert summary["steps"] == [2, 3]
    assert summary["wall_ms_per_step"] > 0 and summary["host_syncs_per_step"] == 0  # a CPU run never waits on a GPU
    names = [row[0] for row in summary["top_host_ops"]]
    assert "aten::addmm" in names or "aten::mm" in names or "aten::linear" in names, names
    assert (out / profiling.TRACE).stat().st_size > 0


def test_stacks_asked_for_put_python_frames_in_the_trace(home, tmp_path, monkeypatch):
    import gzip

    out = tmp_path / "profile"
    monkeypatch.setenv(profiling.STEPS_ENV, "2:1")
    monkeypatch.setenv(profiling.DIR_ENV, str(out))
    monkeypatch.setenv(profiling.STACKS_ENV, "1")
    run, writer = prepared_run(fast_preset("train.max_steps=3", "train.save_steps=100"), tmp_path / "run")
    run.build_trainer().train()
    writer.close()
    assert json.loads((out / profiling.SUMMARY).read_text())["stacks"] is True
    with gzip.open(out / profiling.TRACE, "rt") as f:
        events = json.load(f)["traceEvents"]
    frames = [e["name"] for e in events if e.get("cat") == "python_function"]
    assert any("sftop/engine/train/trainer.py" in f and "training_step" in f for f in frames)


def test_a_profiler_that_cannot_start_leaves_the_run_going(tmp_path, monkeypatch):
    import torch.profiler
    from types import SimpleNamespace

    def refuse(**_kw):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    callback = profiling.StepProfiler(3, 2, tmp_path)
    callback.on_step_begin(None, SimpleNamespace(global_step=1), None)  # not yet
    assert not (tmp_path / profiling.SUMMARY).exists()
    callback.on_step_begin(None, SimpleNamespace(global_step=2), None)
    callback.on_step_end(None, SimpleNamespace(global_step=4), None)
    assert json.loads((tmp_path / profiling.SUMMARY).read_text()) == {
        "error": "profiler: RuntimeError: CUPTI unavailable"
    }


class _OldKinetoEvent:
    """torch 2.11's `_KinetoEvent`: a device type, no activity type."""

    def __init__(self, name, device, start, duration, thread=1):
        self._name, self._device, self._start, self._duration, self._thread = name, device, start, duration, thread

    def name(self):
        return self._name

    def device_type(self):
        return f"DeviceType.{self._device}"

    def start_ns(self):
        return self._start

    def duration_ns(self):
        return self._duration

    def start_thread_id(self):
        return self._thread


class _NewKinetoEvent(_OldKinetoEvent):
    def __init__(self, name, device, start, duration, activity):
        super().__init__(name, device, start, duration)
        self._activity = activity

    def activity_type(self):
        return self._activity


def test_events_of_torch_without_activity_types_keep_kernels_and_drop_device_annotations():
    events = [
        _OldKinetoEvent("ProfilerStep#3", "CPU", 0, 100),
        _OldKinetoEvent("ProfilerStep#3", "CUDA", 5, 90),  # the device's mirror of the step range
        _OldKinetoEvent("aten::mm", "CPU", 10, 5),
        _OldKinetoEvent("sm90_xmma_gemm", "CUDA", 20, 30, thread=7),
        _OldKinetoEvent("Memcpy DtoH (Device -> Pinned)", "CUDA", 60, 4, thread=7),
    ]
    assert profiling.device_events(events) == [
        ("ProfilerStep#3", False, 0, 100, 1),
        ("aten::mm", False, 10, 15, 1),
        ("sm90_xmma_gemm", True, 20, 50, 7),
        ("Memcpy DtoH (Device -> Pinned)", True, 60, 64, 7),
    ]


def test_events_with_activity_types_are_classified_by_them():
    events = [
        _NewKinetoEvent("ProfilerStep#3", "CUDA", 5, 90, "gpu_user_annotation"),
        _NewKinetoEvent("gemm", "CUDA", 20, 30, "kernel"),
        _NewKinetoEvent("aten::mm", "CPU", 10, 5, "cpu_op"),
    ]
    assert [(n, d) for n, d, *_ in profiling.device_events(events)] == [("gemm", True), ("aten::mm", False)]
