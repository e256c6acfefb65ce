"""sftop's own per-step code reads values back from the device once per optimizer step, not once
per micro-batch: on a GPU every read-back stalls the host until the queued work finishes."""

import sys
from pathlib import Path

import pytest
import torch

from train_helpers import events_of, fast_preset, of_type, prepared_run

TRAIN_CODE = str(Path(__file__).resolve().parents[2] / "sftop" / "engine" / "train")
READS = ("__bool__", "item", "tolist", "__float__", "__int__")


class ReadCounter:
    """Counts reads of floating-point tensor values to the host made directly by sftop's training code."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original, name))

    def _wrap(self, original, name):
        counter = self

        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                if caller.f_code.co_filename.startswith(TRAIN_CODE):
                    counter.calls.append(f"{caller.f_code.co_name}:{name}")
            return original(tensor, *args, **kwargs)

        return read


def test_a_steps_values_are_read_after_the_next_steps_micro_batches_are_queued(home, tmp_path, monkeypatch):
    """The update guard's verdict and the log line of step N are read back once each, and only after
    step N+1's micro-batches have run their forwards: on a GPU the host then never waits between
    steps with nothing queued. The last step's are read at the run's end."""
    from sftop.engine.train.step_readback import HeldValues

    steps, accumulation = 3, 4
    preset = fast_preset(
        f"train.max_steps={steps}",
        "train.save_steps=100",
        "plan.micro_batch=1",
        f"plan.grad_accum={accumulation}",
        "train.sample_prompts=[]",
    )
    run, writer = prepared_run(preset, tmp_path / "run")
    trainer = run.build_trainer()
    assert trainer.args.logging_nan_inf_filter is False  # transformers' own per-micro-batch check
    timeline: list = []
    run.model.register_forward_pre_hook(lambda module, args: timeline.append("forward"))
    real_read = HeldValues.read
    monkeypatch.setattr(HeldValues, "read", lambda held: timeline.append(("read", held.step)) or real_read(held))
    counter = ReadCounter(monkeypatch)
    trainer.train()
    monkeypatch.undo()
    writer.close()
    assert run.guard.lagging
    reads = [(timeline[:i].count("forward"), event[1]) for i, event in enumerate(timeline) if event != "forward"]
    assert sorted(step for _forwards, step in reads) == [1, 1, 2, 2, 3, 3]
    for forwards, step in reads:
        assert forwards == accumulation * min(step + 1, steps), (step, forwards, timeline)
    assert counter.calls == ["read:tolist"] * 2 * steps, counter.calls
    logged = of_type(events_of(run.run_dir.path), "step")
    assert [s["step"] for s in logged] == [1, 2, 3] and all(s["loss"] > 0 and s["grad_norm"] > 0 for s in logged)
    assert [round(s["learning_rate"], 6) for s in logged] == [0.003, 0.002, 0.001]
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert history == pytest.approx([s["loss"] for s in logged], rel=1e-6)


def test_a_non_finite_micro_batch_still_skips_its_update(home, tmp_path):
    from sftop.engine.train.update_guard import UpdateGuard

    guard = UpdateGuard(max_bad_steps=3)
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    for loss in (1.0, float("nan"), 2.0):
        guard.note_loss(torch.tensor(loss))
    guard.on_pre_optimizer_step(None, None, None, model=model)
    assert guard.step_bad and guard.consecutive == 1 and all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    guard.note_loss(torch.tensor(1.5))
    guard.on_pre_optimizer_step(None, None, None, model=model)
    assert (
        not guard.step_bad
        and guard.consecutive == 0
        and guard.last_grad_norm == pytest.approx(torch.tensor([1.0, 1.0, 1.0]).norm().item())
    )


# Reads of tensor values to the host anywhere in a training step (transformers, TRL, PEFT, torch,
# sftop), by the function that made them, that are expected once per optimizer step: the update
# guard's verdict (gradient norm and the losses' finiteness) and the log line's loss and gradient
# norm (logging_steps = 1), each copied to pinned host memory and read one step later
# (step_readback.py).
PER_STEP = {"read:tolist": 2}
# Reads of host tensors, which never wait for the device: the collators (in a worker process on a GPU).
HOST_DATA = {"torch_call", "pad_to_bucket"}
# Once per run: the data loader's seed, and the run's mean loss at its end.
ONCE = {"__init__:item": 1, "_finalize_training:item": 1}


@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="sftop's kernels need a GPU or the Triton interpreter",
)
def test_no_read_back_per_micro_batch_anywhere_in_the_step(home, tmp_path, monkeypatch):
    """The whole step's host path, not only sftop's code: packed micro-batches through sftop's loss
    kernel with gradient accumulation. An explicit read (item, tolist, bool, float, int of a tensor)
    that comes back per micro-batch, or a second one per step, fails this, wherever it comes from; so
    does transformers counting the model's parameters for every micro-batch again. (Syncs inside
    torch operations, such as the eager fused loss's `nonzero`, are not Python calls: the GPU
    profile of benchmarks/whole_run.py --profile counts those.)"""
    import collections

    import transformers.masking_utils as masking
    from transformers import PreTrainedModel

    steps = 3
    preset = fast_preset(
        'train.kernels="on"',
        'train.length_buckets="on"',
        "plan.micro_batch=2",
        "plan.grad_accum=2",
        f"train.max_steps={steps}",
        "train.save_steps=100",
        "train.sample_prompts=[]",
    )
    run, writer = prepared_run(preset, tmp_path / "run")
    trainer = run.build_trainer()
    assert run.plan.grad_accum == 2 and run.info.kernels["parts"]["loss"] == "fused"
    packed_attention = run.info.kernels["parts"].get("attention") == "fused"
    reads: collections.Counter = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, _original=original, _name=name, **kwargs):
            code = sys._getframe(1).f_code
            if code.co_name not in HOST_DATA and not (code.co_filename == masking.__file__ and not packed_attention):
                reads[f"{code.co_name}:{_name}"] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    counts = []
    real_count = PreTrainedModel.num_parameters
    monkeypatch.setattr(
        PreTrainedModel, "num_parameters", lambda self, *a, **k: counts.append(1) or real_count(self, *a, **k)
    )
    trainer.train()
    monkeypatch.undo()
    writer.close()
    assert dict(reads) == {**{k: v * steps for k, v in PER_STEP.items()}, **ONCE}, dict(reads)
    assert len(counts) == 1  # counted once for the FLOPs estimate, not per micro-batch
    assert trainer.state.total_flos > 0
    assert len(of_type(events_of(run.run_dir.path), "step")) == steps
