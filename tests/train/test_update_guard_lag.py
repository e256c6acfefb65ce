"""The update guard reading its verdicts one step late skips the same updates, leaves the same
adapter, optimizer state and learning rates, and reports the same bad steps as reading them at once."""

import types

import pytest
import torch
from transformers import TrainerControl

from sftop.engine.train.step_readback import HeldValues, can_step_back, skips_on_device, step_back
from sftop.engine.train.update_guard import UpdateGuard

NAN = float("nan")


class Wrapped:
    """What accelerate's optimizer wrapper shows the guard and transformers' loop."""

    def __init__(self, inner):
        self.optimizer, self.param_groups, self.scaler, self._is_overflow = inner, inner.param_groups, None, False

    @property
    def step_was_skipped(self):
        return self._is_overflow


def _train(pattern, lag: bool, max_bad_steps: int = 3, save_at=()):
    """transformers' order of one optimizer step per entry ("bad grads", "bad loss" or "good"):
    guard, update, scheduler step unless skipped, zero_grad, step end, log/save."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, dtype=torch.float32))
    inner = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01, fused=True)
    optimizer = Wrapped(inner)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0 - step / 10)
    guard = UpdateGuard(max_bad_steps=max_bad_steps, lag=lag)
    state, control = types.SimpleNamespace(global_step=0), TrainerControl()
    rates, saved = [], []
    for i, kind in enumerate(pattern):
        weight.grad = torch.full_like(weight, NAN if kind == "bad grads" else 0.5 + i)
        guard.note_loss(torch.tensor(NAN if kind == "bad loss" else 1.0 + i))
        guard.on_pre_optimizer_step(None, state, control, optimizer=optimizer, lr_scheduler=scheduler)
        rates.append(inner.param_groups[0]["lr"])
        inner.step()
        if not optimizer.step_was_skipped:
            scheduler.step()
        inner.zero_grad()
        state.global_step += 1
        control.should_save = state.global_step in save_at
        guard.on_step_end(None, state, control)
        if control.should_save or control.should_training_stop or i == len(pattern) - 1:
            guard.settle(control, scheduler)
        if control.should_save:
            saved.append(state.global_step)
        if control.should_training_stop:
            break
    adam = inner.state[weight]
    return {
        "weight": weight.detach().clone(),
        "adam": (adam["step"].item(), adam["exp_avg"].clone(), adam["exp_avg_sq"].clone()),
        "rates": rates,
        "scheduler": (scheduler.last_epoch, inner.param_groups[0]["lr"]),
        "bad": dict(guard.bad_steps),
        "stopped_at": state.global_step if guard.failed else None,
        "saved": saved,
        "lagging": guard.lagging,
    }


@pytest.mark.parametrize(
    "pattern",
    [
        ["good"] * 4,
        ["good", "bad grads", "good", "good"],
        ["good", "bad loss", "good", "bad grads", "good"],
        ["good", "bad grads", "bad loss", "good", "good"],
        ["good", "good", "bad grads", "bad grads", "bad grads", "good"],
        ["bad grads", "good", "good"],
        ["good", "good", "good", "bad loss"],
    ],
)
def test_late_verdicts_train_exactly_as_verdicts_read_at_once(pattern):
    at_once, late = _train(pattern, lag=False), _train(pattern, lag=True)
    assert late["lagging"] and not at_once["lagging"]
    assert torch.equal(late["weight"], at_once["weight"])
    trained = pattern[: at_once["stopped_at"] or len(pattern)]
    assert late["adam"][0] == at_once["adam"][0] == trained.count("good")
    assert torch.equal(late["adam"][1], at_once["adam"][1]) and torch.equal(late["adam"][2], at_once["adam"][2])
    assert late["rates"] == at_once["rates"]
    assert late["scheduler"] == at_once["scheduler"]
    assert late["bad"] == at_once["bad"]
    assert late["stopped_at"] == at_once["stopped_at"]


def test_a_streak_stops_the_run_at_the_same_step_and_saves_only_good_updates():
    pattern = ["good", "good", "bad grads", "bad loss", "bad grads", "good", "good"]
    at_once = _train(pattern, lag=False, save_at=(2, 3, 4))
    late = _train(pattern, lag=True, save_at=(2, 3, 4))
    assert at_once["stopped_at"] == late["stopped_at"] == 5
    assert at_once["bad"] == late["bad"] == {3: 1, 4: 2, 5: 3}
    assert at_once["saved"] == late["saved"] == [2]
    assert torch.equal(late["weight"], at_once["weight"])


def test_a_bad_update_is_found_one_step_late_but_never_after_a_checkpoint_of_it():
    late = _train(["good", "bad grads", "good"], lag=True, save_at=(2,))
    assert late["saved"] == [] and late["bad"] == {2: 1}


def test_one_bad_step_allowed_reads_each_verdict_at_once():
    run = _train(["good", "bad grads", "good"], lag=True, max_bad_steps=1)
    assert not run["lagging"] and run["stopped_at"] == 2


def test_what_the_guard_needs_to_read_late():
    weight = torch.nn.Parameter(torch.zeros(2))
    fused = torch.optim.AdamW([weight], fused=True)
    assert skips_on_device(Wrapped(fused)) and skips_on_device(fused)
    assert not skips_on_device(torch.optim.AdamW([weight], foreach=True))
    assert not skips_on_device(torch.optim.SGD([weight], lr=0.1))
    assert can_step_back(torch.optim.lr_scheduler.LambdaLR(fused, lambda s: 1.0))
    assert not can_step_back(torch.optim.lr_scheduler.StepLR(fused, step_size=2))


def test_step_back_restores_the_rate_of_the_step_before():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.125
    assert step_back(scheduler)
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == 0.25 and scheduler.get_last_lr() == [0.25]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.125


def test_held_values_keep_numbers_and_read_tensors_as_floats():
    loss = torch.tensor(2.5)
    held = HeldValues(7, {"loss": loss, "norm": None, "count": 3, "bad": torch.tensor(True)})
    loss.add_(1.0)  # a later change on the device does not reach what was held
    assert held.step == 7 and held.read() == {"norm": None, "count": 3.0, "loss": 2.5, "bad": 1.0}


def test_an_fp16_grad_scaler_keeps_verdicts_read_at_once():
    """fp16's grad scaler sets the fused optimizer's found_inf itself, which would overwrite the
    guard's: with a scaler the guard reads before each update."""
    weight = torch.nn.Parameter(torch.zeros(3))
    inner = torch.optim.AdamW([weight], lr=0.1, fused=True)
    optimizer = Wrapped(inner)
    optimizer.scaler = object()
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0)
    guard = UpdateGuard(max_bad_steps=3, lag=True)
    weight.grad = torch.full_like(weight, NAN)
    guard.on_pre_optimizer_step(
        None, types.SimpleNamespace(global_step=0), TrainerControl(), optimizer=optimizer, lr_scheduler=scheduler
    )
    assert not guard.lagging and guard.step_bad and weight.grad is None and guard.bad_steps == {1: 1}
