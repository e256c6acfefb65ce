"""Skipping optimizer updates whose loss or gradients are NaN/inf, and ending a run after too many in
a row."""

from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import TrainerCallback

from sftop.engine.train.distributed import ranks_max
from sftop.engine.train.step_readback import HeldValues, can_step_back, skips_on_device, step_back


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads`. FSDP2 ranks hold shards (DTensors): their squares are summed
    over the ranks, so every rank reads the same norm and skips (or keeps) the same update."""
    from sftop.engine.train.fsdp import local_grad_square_sum, sharded_grads

    if sharded_grads(grads):
        squares = local_grad_square_sum(grads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(squares)
        return squares.sqrt()
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


class UpdateGuard(TrainerCallback):
    """Skips an optimizer update whose loss or gradients are NaN/inf, and counts them in a row.

    Read at once (the default): the verdict is read before the update; a bad update's gradients are
    dropped (set to None, which every torch optimizer treats as "no update for this parameter", so
    Adam's moments and step counts stay untouched) and the scheduler step is skipped the same way
    transformers skips it after an fp16 overflow.

    Read one step late (`lag=True`, with torch's fused AdamW without fp16's grad scaler, a LambdaLR
    schedule and one process; step_readback.py says why): the verdict goes to the optimizer on the
    device (`found_inf`: the fused update skips itself and takes its step counts back) and to the
    host at the next step's update, which then takes back the scheduler step the bad update had.
    Inside a streak of bad updates, and wherever a checkpoint, an evaluation or the end of the run
    needs it (`settle`), the verdict is read at once, so a run stops and saves at the same steps
    either way.
    """

    def __init__(self, max_bad_steps: int, lag: bool = False):
        self.max_bad_steps = max_bad_steps
        # With one bad step allowed, the run must stop at that step: there is no late reading then.
        self.lag = lag and max_bad_steps > 1
        self.step_bad = False  # the update just attempted was skipped (known at once)
        self.consecutive = 0
        self.last_grad_norm: float | None = None
        self.failed = False
        # All micro-batch losses of this optimizer step finite, kept on the device: reading it back
        # per micro-batch would stall the host once per micro-batch; it is read with the gradient
        # norm, in the one host read of an optimizer step.
        self._losses_finite: torch.Tensor | None = None
        self._lagging: bool | None = None  # decided at the first update, from the optimizer and scheduler
        self._held: HeldValues | None = None  # the last update's verdict, not read yet
        self.bad_steps: dict[int, int] = {}  # step -> bad updates in a row at it
        self.settled_through: int | None = None  # the last step whose verdict is known
        self.unreported: list[tuple[int, int]] = []  # (step, in a row) not written as events yet
        # The trainer's held log lines: written once the guard has read their steps' verdicts.
        self.on_settled: Callable[[], None] | None = None

    @property
    def lagging(self) -> bool:
        """Whether verdicts are read one step late (known from the first update on)."""
        return bool(self._lagging)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record whether a micro-batch loss was finite, without waiting for the GPU."""
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def was_bad(self, step: int) -> bool:
        return step in self.bad_steps

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        # what the optimizer updates: its few LoRA tensors, not a walk over every module of the model
        source = (
            (p for group in optimizer.param_groups for p in group["params"])
            if optimizer is not None
            else model.parameters()
        )
        params = [p for p in source if p.grad is not None]
        losses_finite, self._losses_finite = self._losses_finite, None
        step = state.global_step + 1 if state is not None else None
        if self._lagging is None:
            self._lagging = (
                self.lag
                and step is not None
                and optimizer is not None
                and skips_on_device(optimizer)
                # fp16's grad scaler sets the fused optimizer's found_inf itself, over this one's
                and getattr(optimizer, "scaler", None) is None
                and can_step_back(lr_scheduler)
                and not (torch.distributed.is_available() and torch.distributed.is_initialized())
            )
        if self._lagging and params:
            self._hold(step, params, losses_finite, optimizer, lr_scheduler)
        else:
            self.settle(None, lr_scheduler)  # a verdict still held comes first
            self._read_now(params, losses_finite, optimizer)
            if step is not None:
                self._record(step, self.step_bad)

    def _read_now(self, params, losses_finite, optimizer) -> None:
        grads_bad = loss_bad = False
        if params:
            total = _grad_norm([p.grad for p in params])
            flags = [total]
            if losses_finite is not None:
                flags.append(losses_finite.to(device=total.device, dtype=total.dtype))
            read = torch.stack(flags).tolist()  # the one host read of the step
            grads_bad = not math.isfinite(read[0])
            self.last_grad_norm = None if grads_bad else read[0]
            loss_bad = len(read) > 1 and read[1] < 1
        elif losses_finite is not None and not bool(losses_finite):
            loss_bad = True
        # Each rank of a multi-process run sees only its own micro-batches' losses: a loss that is
        # not finite on one rank (a batch with nothing to score) may come with finite gradients. All
        # ranks must skip the same updates, or their adapters drift apart and one rank stops on a
        # streak of bad steps while the others wait for it.
        grads_bad, loss_bad = (bool(flag) for flag in ranks_max([grads_bad, loss_bad]))
        self.step_bad = loss_bad or grads_bad
        if self.step_bad:
            for p in params:
                p.grad = None
            self.consecutive += 1
        else:
            self.consecutive = 0
        if optimizer is not None and getattr(optimizer, "scaler", None) is None:
            optimizer._is_overflow = self.step_bad

    def _hold(self, step: int, params, losses_finite, optimizer, lr_scheduler) -> None:
        total = _grad_norm([p.grad for p in params])
        bad = ~torch.isfinite(total)
        if losses_finite is not None:
            bad = bad | ~losses_finite.to(bad.device)
        # the fused update skips itself (and takes its step counts back) where this is 1
        getattr(optimizer, "optimizer", optimizer).found_inf = bad.to(torch.float32)
        previous, self._held = self._held, HeldValues(step, {"grad_norm": total, "bad": bad})
        self.step_bad = False
        if previous is not None:
            self._take(previous, lr_scheduler, scheduler_stepped=True)
        if self.consecutive > 0:  # inside a streak: this update's verdict now, so the run stops at it
            self.settle(None, lr_scheduler, before_update=True)
        if getattr(optimizer, "scaler", None) is None:
            optimizer._is_overflow = self.step_bad  # transformers then skips the scheduler step
        if self.on_settled is not None:
            self.on_settled()

    def settle(self, control, lr_scheduler, before_update: bool = False) -> None:
        """Read the verdict still held (the last update's), if any: for a checkpoint (never of a bad
        update), an evaluation, the run's end, or inside a streak before the update. After the update
        a bad one's scheduler step is taken back; `control` (if given) learns whether to save or stop."""
        held, self._held = self._held, None
        if held is None:
            return
        self.step_bad = self._take(held, lr_scheduler, scheduler_stepped=not before_update)
        if control is not None and self.step_bad:
            control.should_save = False
        if control is not None and self.failed:
            control.should_training_stop = True
            control.should_save = False

    def _take(self, held: HeldValues, lr_scheduler, scheduler_stepped: bool) -> bool:
        """Count a held verdict in; whether its update was bad."""
        values = held.read()
        bad = bool(values["bad"])
        if bad:
            self.consecutive += 1
            if scheduler_stepped:  # the bad update's scheduler step was taken: take it back
                step_back(lr_scheduler)
        else:
            self.consecutive = 0
            self.last_grad_norm = values["grad_norm"]
        self._record(held.step, bad)
        return bad

    def _record(self, step: int, bad: bool) -> None:
        self.settled_through = step
        if bad:
            self.bad_steps[step] = self.consecutive
            self.unreported.append((step, self.consecutive))
        if self.consecutive >= self.max_bad_steps:
            self.failed = True

    def take_unreported(self) -> list[tuple[int, int]]:
        """Bad updates (step, in a row) found since the last call, for the run's events."""
        found, self.unreported = self.unreported, []
        return found

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # With an fp16 grad scaler, accelerate recomputes the flag in step(): set it again.
        if self.step_bad and optimizer is not None:
            optimizer._is_overflow = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_bad:
            control.should_save = False  # checkpoints only at good steps: resuming never starts mid-streak
        if self.consecutive >= self.max_bad_steps:
            self.failed = True
        if self.failed:
            control.should_training_stop = True
            control.should_save = False  # keep the last good checkpoint as the newest one
        return control
