"""The memory cap (plan.max_memory_gib / plan.max_memory_fraction): plan, probe, OOM recovery, run time."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from _shapes import llama_1b, one_gpu, preset
from test_planner_verify import FakeMemory

from sftop.engine.errors import PresetError, ResourceError
from sftop.engine.gpu import GIB
from sftop.engine.planner import on_oom, plan_run, render_plan, run_probe
from sftop.engine.planner.cap import allocator_fraction, hold_to_cap
from sftop.engine.planner.estimate import CUDA_CONTEXT_BYTES


def test_the_cap_keys_are_validated():
    from sftop.engine.presets import validate

    with pytest.raises(PresetError, match="max_memory_gib = 8 and plan.max_memory_fraction = 0.5 .* keep one of them"):
        validate({"plan": {"max_memory_gib": 8, "max_memory_fraction": 0.5}}, "my.toml")
    with pytest.raises(PresetError, match="plan.max_memory_fraction. input should be less than or equal to 1"):
        validate({"plan": {"max_memory_fraction": 1.5}}, "my.toml")
    with pytest.raises(PresetError, match="plan.max_memory_gib. input should be greater than 0"):
        validate({"plan": {"max_memory_gib": 0}}, "my.toml")
    assert preset(max_memory_gib=8).plan.max_memory_gib == 8.0


def test_the_planner_stays_under_the_cap_on_a_big_gpu():
    free = plan_run(preset(), llama_1b(), gpus=one_gpu(80))
    assert free.predicted_peak_gib > 6 and free.max_memory_gib is None  # the cap below really binds
    capped = plan_run(preset(max_memory_gib=6), llama_1b(), gpus=one_gpu(80))
    assert capped.budget_gib == 6.0 and capped.max_memory_gib == 6.0
    assert capped.predicted_peak_gib <= 6.0
    assert all(c["fits"] == (c["predicted_peak_gib"] <= 6.0) for c in capped.candidates)
    assert capped.memory_cap == "plan.max_memory_gib = 6"
    assert "capped by plan.max_memory_gib = 6" in capped.reason
    data = json.loads(json.dumps(capped.to_dict()))
    assert data["max_memory_gib"] == 6.0 and data["memory_cap"] == "plan.max_memory_gib = 6"
    assert "memory cap       6.00 GiB (plan.max_memory_gib = 6)" in render_plan(capped)
    assert "memory cap" not in render_plan(free)


def test_the_fraction_is_of_the_gpus_total_memory():
    plan = plan_run(preset(max_memory_fraction=0.1), llama_1b(), gpus=one_gpu(80, used_gib=30))
    assert plan.budget_gib == pytest.approx(8.0, abs=1e-3) and plan.max_memory_gib == pytest.approx(8.0, abs=1e-3)
    assert plan.predicted_peak_gib <= 8.0
    assert plan.memory_cap == "plan.max_memory_fraction = 0.1 of 80.0 GiB"
    hypothetical = plan_run(preset(max_memory_fraction=0.25), llama_1b(), gpu_memory_gib=24)
    assert hypothetical.budget_gib == pytest.approx(6.0, abs=1e-3)


def test_a_cap_above_the_free_memory_leaves_the_budget_to_the_gpu():
    uncapped = plan_run(preset(), llama_1b(), gpus=one_gpu(24, used_gib=16))
    plan = plan_run(preset(max_memory_gib=20), llama_1b(), gpus=one_gpu(24, used_gib=16))
    assert plan.budget_gib == uncapped.budget_gib < 8
    assert any("more than the" in n and "uses what is free" in n for n in plan.notes)


def test_a_cap_below_the_smallest_plan_is_refused_with_the_cap_that_fits():
    with pytest.raises(ResourceError) as info:
        plan_run(preset(max_memory_gib=2.5), llama_1b(), gpus=one_gpu(80))
    text = str(info.value)
    assert "needs" in text and "but plan.max_memory_gib = 2.5 allows 2.50 GiB on cuda:0" in text
    need = info.value.needed_gib
    advice = f"raise plan.max_memory_gib to {math.ceil(10 * need) / 10:.1f}"
    assert advice in text
    assert "use a GPU with" not in text  # the GPU has the room: the cap is what to change
    # 4-bit weights are sized under the cap too, and do fit it
    assert any(o.startswith("set model.load_in_4bit = true") for o in info.value.options)
    # the value the refusal names does fit
    ok = plan_run(preset(max_memory_gib=math.ceil(10 * need) / 10), llama_1b(), gpus=one_gpu(80))
    assert ok.predicted_peak_gib <= ok.max_memory_gib


def test_a_fraction_cap_refusal_names_the_fraction_that_fits():
    with pytest.raises(ResourceError) as info:
        plan_run(preset(max_memory_fraction=0.02), llama_1b(), gpus=one_gpu(80))
    need = info.value.needed_gib
    fraction = math.ceil(100 * need * GIB / (80 * GIB)) / 100
    assert f"raise plan.max_memory_fraction to {fraction:.2f}" in str(info.value)
    plan_run(preset(max_memory_fraction=fraction), llama_1b(), gpus=one_gpu(80))


def test_the_probe_steps_down_within_the_cap():
    plan = plan_run(preset(max_memory_gib=6), llama_1b(), gpus=one_gpu(80))
    mem = FakeMemory()
    seen = []

    def step(rows, tokens):
        # the real run needs 30% more than the model says: the probe must step down, never past the cap
        current = seen_plan[-1]
        model_says = current.predicted_allocated_gib - current.breakdown.get("probe_correction", 0.0)
        mem.peak = int(1.3 * model_says * GIB)

    seen_plan = [plan]

    def changed(old, new, why):
        seen.append(new)
        seen_plan.append(new)

    final, verdicts = run_probe(plan, step, memory=mem, on_change=changed)
    assert seen and verdicts[-1].ok
    for p in [plan, *seen]:
        assert p.budget_gib == 6.0 and p.max_memory_gib == 6.0 and p.predicted_peak_gib <= 6.0
    # the accepted probe's device peak (reserved + CUDA context) is within the cap
    assert verdicts[-1].measured_reserved_gib + CUDA_CONTEXT_BYTES / GIB <= 6.0


def test_oom_recovery_keeps_the_cap_and_only_shrinks():
    plan = plan_run(preset(max_memory_gib=10), llama_1b(), gpus=one_gpu(80))
    assert plan.micro_batch > 1
    new = on_oom(plan, step=7)
    assert new.max_memory_gib == 10.0 and new.budget_gib == 10.0
    assert new.predicted_peak_gib <= plan.predicted_peak_gib <= 10.0
    assert new.micro_batch * new.grad_accum == plan.effective_batch


class FakeCuda:
    """torch.cuda's calls hold_to_cap makes, recorded."""

    def __init__(self, total_gib: float, available: bool = True):
        self.total = int(total_gib * GIB)
        self.available = available
        self.calls = []

    def is_available(self):
        return self.available

    def get_device_properties(self, index):
        return SimpleNamespace(total_memory=self.total)

    def set_per_process_memory_fraction(self, fraction, index):
        self.calls.append((fraction, index))


def test_the_trainer_holds_its_allocator_to_the_cap_less_the_cuda_context():
    cuda = FakeCuda(80)
    fraction = hold_to_cap(8.0, "cuda:0", cuda)
    assert cuda.calls == [(fraction, 0)]
    assert fraction * 80 * GIB + CUDA_CONTEXT_BYTES == pytest.approx(8 * GIB, rel=1e-9)
    assert hold_to_cap(None, "cuda:0", cuda) is None and len(cuda.calls) == 1
    assert hold_to_cap(8.0, "cpu", cuda) is None
    assert hold_to_cap(8.0, "cuda:0", FakeCuda(80, available=False)) is None
    assert allocator_fraction(200 * GIB, 80 * GIB) == 1.0
    assert allocator_fraction(CUDA_CONTEXT_BYTES // 2, 80 * GIB) == 0.0


def test_out_of_steps_under_a_cap_says_to_raise_it():
    plan = plan_run(
        preset(max_memory_gib=6, micro_batch=1, gradient_checkpointing="offload"), llama_1b(), gpus=one_gpu(80)
    )
    with pytest.raises(ResourceError, match=r"Raise plan.max_memory_gib \(now 6.00 GiB\) or remove it; or set model"):
        on_oom(plan, step=3)


def test_sftop_plan_shows_the_cap(capsys):
    from sftop.cli import main

    assert main(["plan", "demo", "--gpu-memory", "24", "--set", "plan.max_memory_gib=3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_memory_gib"] == 3.0 and data["budget_gib"] == 3.0 and data["predicted_peak_gib"] <= 3.0
    assert main(["plan", "demo", "--gpu-memory", "24", "--set", "plan.max_memory_fraction=0.25"]) == 0
    assert "memory cap       6.00 GiB (plan.max_memory_fraction = 0.25 of 24.0 GiB)" in capsys.readouterr().out
    assert main(["plan", "demo", "--gpu-memory", "24", "--set", "plan.max_memory_gib=0.5"]) != 0
    assert "raise plan.max_memory_gib to 0.7" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_allocator_cannot_grow_past_the_cap():
    import torch

    from sftop.kernels.cuda_graphs import _room_for_capture

    torch.cuda.empty_cache()
    # Earlier GPU tests in this process may still hold memory: the cap leaves 1.4 GiB beyond it
    # (a cap counts the 0.6 GiB CUDA context too), so the amounts below mean the same either way.
    held = torch.cuda.memory_reserved() / GIB
    try:
        fraction = hold_to_cap(2.0 + held, "cuda:0")
        assert fraction is not None and torch.cuda.get_per_process_memory_fraction() == pytest.approx(fraction)
        small = torch.empty(int(0.5 * GIB), dtype=torch.uint8, device="cuda")  # under the cap: fine
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
        # graph capture judges its room under the cap, not by the GPU's free memory
        torch.cuda.reset_peak_memory_stats()
        peak = torch.empty(int(0.8 * GIB), dtype=torch.uint8, device="cuda")
        del peak
        assert _room_for_capture() is not None  # twice 0.8 GiB does not fit beside 0.5 GiB under a 1.4 GiB limit
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
