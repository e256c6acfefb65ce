"""sftop/engine/train/train_mode.py: transformers' per-step `model.train()` is skipped only where
every module trains already; a model with any module in evaluation mode still gets the real call."""

from __future__ import annotations

import torch
from torch import nn

from sftop.engine.train.train_mode import train_call_skipped, training_everywhere


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 2))
        self.calls = 0

    def train(self, mode: bool = True):
        self.calls += 1
        return super().train(mode)


def test_a_model_training_everywhere_skips_the_walk():
    model = Counting()
    model.train()
    calls = model.calls
    with train_call_skipped(model):
        assert model.train() is model
        assert all(m.training for m in model.modules())
    assert model.calls == calls  # the real train() never ran
    assert "train" not in model.__dict__  # the shadow is gone afterwards
    model.train()
    assert model.calls == calls + 1


def test_a_module_in_evaluation_mode_gets_the_real_call():
    model = Counting()
    model.train()
    model.inner[1].eval()  # e.g. a library switched a submodule off
    assert not training_everywhere(model)
    with train_call_skipped(model):
        model.train()
    assert model.inner[1].training and training_everywhere(model)


def test_eval_inside_the_step_still_switches_to_evaluation():
    model = Counting()
    model.train()
    with train_call_skipped(model):
        model.eval()
        assert not any(m.training for m in model.modules())


def test_sftop_trainers_step_skips_the_walk(monkeypatch, home, tmp_path):
    """A DPO training step through sftop's trainer: the model's real train() does not run while every
    module trains, and the step still trains (the adapter's weights change)."""
    from train_helpers import dpo_trainer

    from sftop.engine.presets import load_preset

    preset, _ = load_preset("demo-dpo", ['train.kernels="off"', "data.max_rows=8", 'model.adapter=""'])
    preset = preset.model_copy(update={"model": preset.model.model_copy(update={"adapter": None})})
    trainer, batch = dpo_trainer(preset, tmp_path)
    model = trainer.model
    model.train()
    walked = []
    real = nn.Module.train
    monkeypatch.setattr(nn.Module, "train", lambda self, mode=True: (walked.append(self), real(self, mode))[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before each step
    loss = trainer.training_step(model, batch)
    assert torch.isfinite(loss)
    assert model not in walked
    assert any(p.grad is not None for n, p in model.named_parameters() if n in before)


def test_the_flags_are_read_off_a_list_made_again_when_the_tree_grows():
    """The check reads a flat list of modules made once, not a walk per micro-batch, and a module
    added anywhere in the tree later (in evaluation mode) is seen at the next check."""
    from sftop.engine.train import train_mode

    model = Counting()
    model.train()
    assert training_everywhere(model)
    listed = train_mode._modules_of(model)
    assert train_mode._modules_of(model) is listed  # no new walk while the tree is unchanged
    late = nn.Dropout(0.5).eval()
    model.inner.append(late)  # a ModuleList/Sequential append registers through add_module
    assert train_mode._modules_of(model) is not listed and late in train_mode._modules_of(model)
    assert not training_everywhere(model)
    model.inner[0].extra = nn.Linear(2, 2).eval()  # attribute assignment registers too
    late.train()
    assert not training_everywhere(model)
    with train_call_skipped(model):
        model.train()  # the real call: a module was in evaluation mode
    assert training_everywhere(model) and model.inner[0].extra.training
