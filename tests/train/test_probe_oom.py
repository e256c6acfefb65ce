"""GPU memory safety paths, exercised on CPU: the probe step leaves no trace, and an OOM mid-run
continues from the last checkpoint with a smaller micro-batch (same effective batch)."""

import pytest
import torch

from sftop.engine.errors import ResourceError
from sftop.engine.events import EventWriter
from sftop.engine.presets import load_preset
from sftop.engine.rundir import RunDir
from sftop.engine.train.probe import probe_step
from sftop.engine.train.runner import _Run
from train_helpers import events_of, fast_preset, of_type, prepared_run


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_probe_step_leaves_weights_rng_and_metrics_untouched(home, tmp_path, checkpointing):
    run, writer = prepared_run(fast_preset(f'plan.gradient_checkpointing="{checkpointing}"'), tmp_path / "run")
    trainer = run.build_trainer()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rng = torch.get_rng_state()
    probe_step(trainer, rows=4, tokens_per_row=32, max_length=32)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), name
            assert p.grad is None
    assert trainer.sftop_step_tokens == 0 and not trainer._metrics["train"]
    writer.close()


def test_probe_step_then_training_matches_a_run_without_it(home, tmp_path):
    losses = []
    for probe in (False, True):
        run, writer = prepared_run(fast_preset("train.max_steps=3", "train.save_steps=100"), tmp_path / f"run{probe}")
        trainer = run.build_trainer()
        if probe:
            probe_step(trainer, rows=4, tokens_per_row=32, max_length=32)
        trainer.train()
        writer.close()
        losses.append([s["loss"] for s in of_type(events_of(run.run_dir.path), "step")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_out_of_memory_mid_run_continues_with_a_smaller_micro_batch(home, tmp_path):
    preset = fast_preset("train.max_steps=8", "train.save_steps=2", "train.save_total_limit=3")
    run, writer = prepared_run(preset, tmp_path / "run")
    calls = {"n": 0}

    def out_of_memory_once(module, args, output):
        # Test-only fault injection: the 6th training forward (step 6) runs out of GPU memory.
        calls["n"] += 1
        if calls["n"] == 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return output

    run.model.get_base_model().model.norm.register_forward_hook(out_of_memory_once)
    # CUDA graphs captured for the old plan's shapes (a GPU run's): released with their pool
    from sftop.kernels.cuda_graphs import StepGraphs
    from sftop.kernels.packed_graphs import _PACKED_GRAPHS

    graphs = StepGraphs()
    graphs._steps["old shape"], graphs._pool = object(), (1, 0)
    run.model.get_base_model().__dict__[_PACKED_GRAPHS] = graphs
    code = run.train()
    writer.close()
    assert code == 0
    assert not graphs.holds("old shape") and graphs._pool is None
    records = events_of(run.run_dir.path)
    changed = of_type(records, "plan_changed")
    assert len(changed) == 1
    assert changed[0]["step"] == 5 and "out of memory" in changed[0]["reason"]
    assert (changed[0]["old"]["micro_batch"], changed[0]["old"]["grad_accum"]) == (4, 1)
    assert (changed[0]["new"]["micro_batch"], changed[0]["new"]["grad_accum"]) == (2, 2)
    started = of_type(records, "run_started")
    assert [s["resumed_from_step"] for s in started] == [None, 4]
    assert started[1]["plan"]["micro_batch"] == 2
    steps = [s["step"] for s in of_type(records, "step")]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 is redone from checkpoint-4
    assert records[-1]["type"] == "run_finished" and records[-1]["step"] == 8
    repeated, _ = load_preset(run.run_dir.preset)
    assert (repeated.plan.micro_batch, repeated.plan.grad_accum) == (2, 2)


class _Allocator:
    """Stands in for torch.cuda's peak counters (the planner's DeviceMemory protocol) on CPU."""

    oom_error = torch.cuda.OutOfMemoryError

    def __init__(self, peaks_gib):
        self.peaks = list(peaks_gib)
        self.probes = 0

    def reset_peak(self):
        pass

    def release(self):
        pass

    def peak_allocated(self):
        return int(self.peaks[min(self.probes, len(self.peaks) - 1)] * 2**30)

    def peak_reserved(self):
        value = self.peak_allocated()
        self.probes += 1
        return value


def test_probe_over_budget_steps_the_plan_down_before_training(home, tmp_path):
    import dataclasses

    run, writer = prepared_run(fast_preset("train.max_steps=2", "train.save_steps=100"), tmp_path / "run")
    # Pretend this plan is for a 1 GiB GPU; the step itself runs for real on CPU.
    run.plan = dataclasses.replace(run.plan, device="cuda:0", budget_gib=1.0)
    run.build_trainer()
    allocator = _Allocator([50.0, 0.01])  # first probe far over budget, the smaller plan fits
    run.probe(memory=allocator)
    assert allocator.probes == 2
    records = events_of(run.run_dir.path)
    changed = of_type(records, "plan_changed")
    assert len(changed) == 1 and changed[0]["step"] == 0 and "over the" in changed[0]["reason"]
    new = changed[0]["new"]
    assert new["micro_batch"] < 4 and new["micro_batch"] * new["grad_accum"] == 4
    assert run.probe_verdict["ok"] is True and "next_plan" not in run.probe_verdict
    assert run.trainer.args.per_device_train_batch_size == new["micro_batch"]  # trainer rebuilt for it
    repeated, _ = load_preset(run.run_dir.preset)
    assert repeated.plan.micro_batch == new["micro_batch"]
    writer.close()


def test_plan_gpu_is_pinned_before_cuda_starts(home, tmp_path, monkeypatch):
    import dataclasses

    from sftop.engine.train.config import build_sft_config

    # Two visible GPUs (setenv also makes monkeypatch restore the real value after the test).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    run_dir = RunDir(tmp_path / "run").create()
    with EventWriter(run_dir.events) as writer:
        run = _Run(fast_preset(), run_dir, writer, resume=False)
        run.plan = dataclasses.replace(
            load_plan(), device="cuda:3", gpu_uuid="GPU-1234", gradient_checkpointing="on", checkpoint_every_n_layers=2
        )
        run.pin_gpu()
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    assert run.plan.device == "cuda:0"
    assert "GPU-1234" in of_type(events_of(run_dir.path), "message")[0]["text"]
    args = build_sft_config(
        run.preset, run.plan, output_dir=tmp_path, dtype="fp32", packing=True, has_eval=False, on_cuda=False
    )
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False, "offload": False, "every_n_layers": 2}


def load_plan():
    from sftop.engine.planner import load_model_config, plan_run

    preset = fast_preset()
    return plan_run(preset, load_model_config(preset))


def test_out_of_memory_on_one_rank_of_several_ends_the_run_with_the_resume_that_fits(home, tmp_path):
    # One rank cannot step down alone (the others wait in a collective for its step): the run must
    # end at once with a clear error instead of hanging until the collective's timeout.
    preset = fast_preset("train.max_steps=8", "train.save_steps=2")
    run, writer = prepared_run(preset, tmp_path / "run")
    run.world_size, run.rank = 2, 1  # this process plays rank 1 of two; no process group is needed

    def out_of_memory(module, args, output):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    run.model.get_base_model().model.norm.register_forward_hook(out_of_memory)
    with pytest.raises(ResourceError) as caught:
        run.train()
    writer.close()
    error = caught.value
    assert "Rank 1 ran out of GPU memory at step 0" in str(error)
    assert error.where == "GPU memory of rank 1"
    assert f"sftop resume {run.run_dir.path.name} --set plan.micro_batch=2" in error.hint
    assert "effective batch stays 4" in error.hint
    assert not of_type(events_of(run.run_dir.path), "plan_changed")  # no rank stepped down alone
