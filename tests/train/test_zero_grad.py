"""sftop/engine/train/zero_grad.py: transformers' per-step `model.zero_grad()` clears the optimizer's
gradients without walking the module tree, only where that is the same thing, and never keeps an
old optimizer alive."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from sftop.engine.train.zero_grad import clear_through_optimizer
from train_helpers import fast_preset, prepared_run


class Adapted(nn.Module):
    """A frozen base and a small trainable adapter, as a LoRA model has."""

    def __init__(self):
        super().__init__()
        self.base = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))
        self.base.requires_grad_(False)
        self.adapter = nn.Linear(4, 4)

    def forward(self, x):
        return self.adapter(self.base(x)).sum()


def _backward(model):
    model(torch.randn(2, 4)).backward()


def test_zero_grad_clears_the_optimizers_gradients_without_the_walk(monkeypatch):
    torch.manual_seed(0)
    model = Adapted()
    adapter = list(model.adapter.parameters())
    optimizer = torch.optim.AdamW(adapter)
    assert clear_through_optimizer(model, optimizer)
    walked = []
    real = nn.Module.named_modules
    monkeypatch.setattr(nn.Module, "named_modules", lambda *a, **k: (walked.append(a[0]), real(*a, **k))[1])
    _backward(model)
    assert all(p.grad is not None for p in adapter)
    walked.clear()
    model.zero_grad()
    assert all(p.grad is None for p in adapter) and not walked
    _backward(model)
    walked.clear()
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in adapter) and not walked
    del model.__dict__["zero_grad"]  # the real one walks: the counter sees it
    model.zero_grad()
    assert walked


def test_a_trainable_parameter_outside_the_optimizer_keeps_the_walk():
    model = Adapted()
    model.base[0].weight.requires_grad_(True)  # trainable, but not the optimizer's
    optimizer = torch.optim.AdamW(model.adapter.parameters())
    assert not clear_through_optimizer(model, optimizer)
    assert "zero_grad" not in model.__dict__
    _backward(model)
    model.zero_grad()  # the real one reaches it
    assert model.base[0].weight.grad is None


def test_an_old_optimizer_is_not_kept_alive_and_the_walk_comes_back():
    """After an out-of-memory step-down the old trainer's optimizer (and its states) must go."""
    model = Adapted()
    optimizer = torch.optim.AdamW(model.adapter.parameters())
    assert clear_through_optimizer(model, optimizer)
    gone = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert gone() is None
    _backward(model)
    model.zero_grad()
    assert all(p.grad is None for p in model.adapter.parameters())


def test_sftop_runs_install_it_when_training_starts(home, tmp_path, monkeypatch):
    walks = []
    real = nn.Module.zero_grad
    monkeypatch.setattr(
        nn.Module, "zero_grad", lambda self, set_to_none=True: (walks.append(self), real(self, set_to_none))[1]
    )
    run, writer = prepared_run(fast_preset("train.max_steps=3"), tmp_path / "run")
    try:
        trainer = run.build_trainer()
        trainer.train()
    finally:
        writer.close()
    model = trainer.model
    assert "zero_grad" in model.__dict__  # shadowed by the optimizer's clear
    assert trainer.state.global_step == 3
    assert len(walks) <= 1, walks  # at most transformers' one call before training begins
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
