from __future__ import annotations

import pytest
from _shapes import llama_1b, one_gpu, preset

from sftop.engine.errors import ResourceError
from sftop.engine.gpu import GIB
from sftop.engine.planner import check_probe, on_oom, plan_run, probe_shape, run_probe, step_down
from sftop.engine.planner.solve import memory_rank, replan


def test_probe_shape():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(80))
    assert probe_shape(plan) == (1, plan.micro_batch * 2048)
    padded = plan_run(preset(packing=False), llama_1b(), gpus=one_gpu(80))
    assert probe_shape(padded) == (padded.micro_batch, 2048)


def test_probe_as_predicted_is_ok():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(24))
    verdict = check_probe(plan, int(plan.predicted_allocated_gib * GIB))
    assert verdict.ok and verdict.next_plan is None
    assert verdict.ratio == pytest.approx(1.0, abs=1e-3)
    assert verdict.to_dict()["next_plan"] is None


def test_probe_over_budget_gives_a_smaller_plan_that_fits_the_measurement():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(24))
    measured = int(plan.budget_gib * GIB)  # with the CUDA context on top this cannot fit
    verdict = check_probe(plan, measured, max_reserved_bytes=int(measured * 1.05))
    assert not verdict.ok and "over the" in verdict.reason
    new = verdict.next_plan
    assert new.effective_batch == plan.effective_batch == new.micro_batch * new.grad_accum
    old_rank = memory_rank(plan.gradient_checkpointing, plan.checkpoint_every_n_layers)
    new_rank = memory_rank(new.gradient_checkpointing, new.checkpoint_every_n_layers)
    assert (new.micro_batch < plan.micro_batch and new_rank >= old_rank) or (
        new.micro_batch <= plan.micro_batch and new_rank > old_rank
    )
    assert new.predicted_peak_gib <= new.budget_gib  # sized with the measured correction
    assert new.breakdown["probe_correction"] > 0
    assert new.reason.startswith("stepped down")
    assert verdict.to_dict()["next_plan"]["micro_batch"] == new.micro_batch


def test_step_down_chain_keeps_effective_batch_and_ends_in_refusal():
    plan = plan_run(preset(micro_batch=8, gradient_checkpointing="off"), llama_1b(), gpus=one_gpu(80))
    seen = [(plan.micro_batch, plan.gradient_checkpointing, plan.checkpoint_every_n_layers)]
    with pytest.raises(ResourceError, match="even at micro-batch 1 with offloaded"):
        for _ in range(20):
            plan = step_down(plan)
            assert plan.micro_batch * plan.grad_accum == 16
            seen.append((plan.micro_batch, plan.gradient_checkpointing, plan.checkpoint_every_n_layers))
    assert seen == [
        (8, "off", 1),
        (4, "off", 1),
        (2, "off", 1),
        (1, "off", 1),
        (1, "on", 2),
        (1, "on", 1),
        (1, "offload", 1),
    ]


def test_on_oom_halves_micro_batch_doubles_accumulation():
    plan = plan_run(preset(micro_batch=8), llama_1b(), gpus=one_gpu(80))
    new = on_oom(plan, step=120)
    assert (new.micro_batch, new.grad_accum) == (4, 4)
    assert new.gradient_checkpointing == plan.gradient_checkpointing
    assert "out of memory at step 120" in new.reason
    assert new.predicted_allocated_gib < plan.predicted_allocated_gib


def test_on_oom_with_odd_effective_batch():
    plan = plan_run(preset(effective_batch=6, micro_batch=3), llama_1b(), gpus=one_gpu(80))
    new = on_oom(plan)
    assert (new.micro_batch, new.grad_accum) == (1, 6)


def test_replan_with_calibration_never_grows():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(16))
    again = replan(plan, calibration=1.3)
    assert again.modelled_step_s >= plan.modelled_step_s


class FakeMemory:
    """Allocator counters for run_probe: each probe 'uses' what a rule says for its shape."""

    class OOM(RuntimeError):
        pass

    oom_error = OOM

    def __init__(self):
        self.peak = 0
        self.released = 0

    def reset_peak(self):
        self.peak = 0

    def peak_allocated(self):
        return self.peak

    def peak_reserved(self):
        return int(self.peak * 1.05)

    def release(self):
        self.released += 1


def test_run_probe_keeps_a_plan_that_fits():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(24))
    mem = FakeMemory()
    shapes = []

    def step(rows, tokens):
        shapes.append((rows, tokens))
        mem.peak = int(plan.predicted_allocated_gib * GIB)

    final, verdicts = run_probe(plan, step, memory=mem)
    assert final is plan and len(verdicts) == 1 and verdicts[0].ok
    assert shapes == [probe_shape(plan)]


def test_run_probe_steps_down_on_oom_and_over_budget_until_it_fits():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(24))
    mem = FakeMemory()
    changes = []

    def step(rows, tokens):
        if tokens > 4096:
            mem.peak = int(3 * GIB)
            raise FakeMemory.OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        # the real run needs 40% more per token than predicted
        mem.peak = int(2.3 * GIB + 1.4 * tokens * 300_000)

    final, verdicts = run_probe(plan, step, memory=mem, on_change=lambda old, new, why: changes.append((old, new, why)))
    assert verdicts[-1].ok and not verdicts[0].ok
    assert "ran out of memory" in verdicts[0].reason
    assert final.tokens_per_micro_batch <= 4096
    assert final.micro_batch * final.grad_accum == 16
    assert len(changes) == len(verdicts) - 1 and changes[0][0] is plan
    assert mem.released >= 2 * len(verdicts)


def test_run_probe_refuses_when_nothing_fits():
    plan = plan_run(preset(effective_batch=2), llama_1b(), gpus=one_gpu(24))
    mem = FakeMemory()

    def step(rows, tokens):
        raise FakeMemory.OOM("CUDA out of memory")

    with pytest.raises(ResourceError):
        run_probe(plan, step, memory=mem)


def test_run_probe_skips_cpu_plans():
    from _shapes import preset as make_preset

    from sftop.engine.gpu import GpuStatus
    from sftop.engine.planner import load_model_config

    demo = make_preset("builtin:demo-tiny", max_length=64)
    plan = plan_run(demo, load_model_config(demo), gpus=GpuStatus(reason="no driver"))
    final, verdicts = run_probe(plan, lambda r, t: pytest.fail("no probe on the CPU"))
    assert final is plan and verdicts == []
