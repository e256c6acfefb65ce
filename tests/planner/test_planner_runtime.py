"""The run-time and cost estimate: calibrated on the measured runs, exact for a fixed model and GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from _fake_nvml import FakeNvml, gpu
from _shapes import llama_1b, preset

from sftop.engine.gpu import read_gpus

from sftop.engine.planner import plan_run
from sftop.engine.planner.runtime import (
    MEASURED_STEPS,
    WHOLE_RUN,
    calibration,
    describe_run_time,
    estimate_run_time,
    gpu_family,
    run_steps,
    _modelled_step_s,
)


def h100():
    return read_gpus(FakeNvml([gpu(0, 80, used=0.5, name="NVIDIA H100 80GB HBM3")]), env={})


def with_train(p, **train):
    return p.model_copy(update={"train": p.train.model_copy(update=train)})


def test_calibration_reproduces_the_measured_runs():
    cal = calibration()
    assert cal.compute_factor == pytest.approx(0.5863, abs=1e-3)
    assert cal.step_overhead_s == pytest.approx(0.1171, abs=1e-3)
    assert cal.startup_s == pytest.approx(23.51, abs=0.01)
    for model, nf4, rows, seq, checkpointing, tokens_s in MEASURED_STEPS:
        predicted_s = cal.compute_factor * _modelled_step_s(model, nf4, rows, seq, checkpointing, False, "sdpa")
        measured_s = rows * seq / tokens_s
        assert predicted_s == pytest.approx(measured_s, rel=0.15)  # every measured step within 15 %
    w = WHOLE_RUN
    step = cal.compute_factor * _modelled_step_s(w["model"], False, 8, w["row_tokens_mean"], "off", True, "varlen")
    assert w["steps"] * (step + cal.step_overhead_s) == pytest.approx(w["train_s"], rel=1e-6)


def test_llama_1b_on_an_h100_for_500_steps_at_a_price():
    p = with_train(preset(price_per_gpu_hour=2.5), max_steps=500)
    plan = plan_run(p, llama_1b(), gpus=h100())
    rt = estimate_run_time(plan, p)
    assert rt.measured and rt.family == "H100/H200" and rt.steps == 500
    assert rt.step_s == pytest.approx(
        calibration().compute_factor * plan.modelled_step_s + calibration().step_overhead_s
    )
    assert rt.step_s == pytest.approx(0.2178, abs=2e-3)
    assert rt.wall_s == pytest.approx(calibration().startup_s + 500 * rt.step_s)
    assert rt.cost == pytest.approx(rt.wall_s / 3600 * 2.5)
    assert rt.cost == pytest.approx(0.092, abs=2e-3)
    line = describe_run_time(rt)
    assert line.startswith("estimate 2 min 1") and "for 500 steps" in line and "cost ≈ 0.09 at 2.5/GPU-hour" in line


def test_other_gpus_scale_the_compute_by_their_tensor_peak():
    p = with_train(preset(), max_steps=100)
    plan = plan_run(p, llama_1b(), gpu_memory_gib=24)
    h100 = estimate_run_time(plan, p, gpu_name="H100")
    rtx = estimate_run_time(plan, p, gpu_name="rtx 4090")
    overhead = calibration().step_overhead_s
    assert not rtx.measured and "not measured" in rtx.basis
    assert (rtx.step_s - overhead) / (h100.step_s - overhead) == pytest.approx(989 / 165)
    assert gpu_family("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert gpu_family("NVIDIA H200") == ("H100/H200", 989.0)
    assert estimate_run_time(plan, p) is None  # a hypothetical GPU without a name: no basis
    assert estimate_run_time(plan, p, gpu_name="Some Future GPU") is None


def test_epochs_count_steps_from_the_rows_as_the_trainer_does():
    p = with_train(preset(), max_steps=None, epochs=2.0)
    plan = plan_run(p, llama_1b(), gpus=h100())
    assert run_steps(p, plan, None) is None
    rows = 1001
    micro_batches = -(-rows // plan.micro_batch)  # ceiling divisions, as the trainer counts
    per_epoch = -(-micro_batches // plan.grad_accum)
    assert run_steps(p, plan, rows) == 2 * per_epoch
    rt = estimate_run_time(plan, p)
    assert rt.wall_s is None and "per 100 steps" in describe_run_time(rt)


def test_no_estimate_on_the_cpu():
    assert "no time estimate on the CPU" in describe_run_time(None, SimpleNamespace(device="cpu", context=None))


def test_sftop_plan_prints_and_returns_the_estimate(tmp_path):
    import os

    env = {**os.environ, "SFTOP_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [
        sys.executable,
        "-m",
        "sftop",
        "plan",
        "llama-3.2-1b-instruct",
        "--gpu-memory",
        "80",
        "--gpu",
        "H100",
        "--set",
        "train.max_steps=500",
        "--set",
        "plan.price_per_gpu_hour=2.5",
    ]
    out = subprocess.run(args + ["--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    estimate = json.loads(out.stdout)["estimate"]
    assert estimate["steps"] == 500 and estimate["basis"] == "calibrated on H100/H200 runs"
    assert estimate["cost"] == pytest.approx(estimate["wall_s"] / 3600 * 2.5, abs=0.01)
    text = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120).stdout
    assert "  time             estimate " in text and "cost ≈" in text


def test_no_estimate_for_a_vision_language_model():
    from sftop.engine.planner.estimate import ModelShape

    p = with_train(preset(), max_steps=100)
    plan = plan_run(p, llama_1b(), gpus=h100())
    plan.context.shape = ModelShape(**{**plan.context.shape.__dict__, "multimodal": True})
    assert estimate_run_time(plan, p) is None
    assert "no time estimate for vision-language models" in describe_run_time(None, plan)
