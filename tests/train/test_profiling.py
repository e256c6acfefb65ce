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
    ]
    summary = profiling.summarise(events, steps=2, wall_s=0.01)
    assert summary["host_syncs_per_step"] == 1
    assert summary["host_syncs_by_cause"] == {"cudaStreamSynchronize in aten::item": 1}
    assert summary["gpu_busy_ms_per_step"] == 3.0 and summary["gpu_busy_share"] == 0.6
    assert summary["top_gpu_kernels"] == [["gemm", 3.0]]


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
