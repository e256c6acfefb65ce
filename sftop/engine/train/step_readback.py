"""An optimizer step's device values (its loss, gradient norm, whether its update was bad) read on
the host one step late, so that the host never waits for the GPU between steps.

Why: reading a device value (`.item()`, `.tolist()`) makes the host wait until the GPU has finished
everything queued before it. Read at every step -- the update guard's verdict before the update,
the log line's loss after it -- each read leaves the GPU idle while the host prepares the next step:
the optimizer's launches, the scheduler, the callbacks, the next batch and its copies. With the
forward and backward replayed from CUDA graphs those host milliseconds are a large share of a step
(a Llama-3.2-1B whole run kept the GPU busy 56% of its steps, docs/benchmarks.md).

How: the values are stacked on the device and copied, without waiting, into pinned host memory;
an event marks when the copy is done. They are read at the next step's update, after that step's
forward and backward have been queued: the GPU then has a whole step in front of it while the host
waits for the previous step's numbers, which are normally there already.
"""

from __future__ import annotations

from typing import Union

import torch

Value = Union[torch.Tensor, float, int, None]


class HeldValues:
    """Named values of one optimizer step, on their way from the device to the host."""

    def __init__(self, step: int, values: dict[str, Value]):
        self.step = step
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        self._numbers = {
            k: (None if v is None else float(v)) for k, v in values.items() if not isinstance(v, torch.Tensor)
        }
        self._names = tuple(tensors)
        self._copied: torch.cuda.Event | None = None
        self._host: torch.Tensor | None = None
        if tensors:
            # one small kernel and one copy for all of them; float64 holds a token count exactly
            stacked = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors.values()])
            if stacked.is_cuda:
                host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
                host.copy_(stacked, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record()
                stacked = host
            self._host = stacked

    def read(self) -> dict[str, float | None]:
        """The values as numbers: waits for their copy only if it has not finished yet."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        numbers = dict(self._numbers)
        if self._host is not None:
            numbers.update(zip(self._names, self._host.tolist()))
        return numbers


def step_back(scheduler) -> bool:
    """Undo a learning-rate scheduler's last step, for an update found bad only after the scheduler
    had stepped for it: the next update then uses the rate it would have had, as when transformers
    skips the scheduler after an fp16 overflow. Only schedulers whose rate is a function of the step
    count (LambdaLR, which transformers' linear, cosine and constant schedules are) can; False for
    any other (the caller then reads each verdict before its scheduler step)."""
    if not can_step_back(scheduler):
        return False
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps torch's scheduler
    if inner.last_epoch < 1:
        return False
    inner.last_epoch -= 1
    rates = [base * rate(inner.last_epoch) for base, rate in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, rates):
        group["lr"] = lr
    inner._last_lr = rates
    return True


def can_step_back(scheduler) -> bool:
    """Whether `step_back` can undo this scheduler's steps."""
    return isinstance(getattr(scheduler, "scheduler", scheduler), torch.optim.lr_scheduler.LambdaLR)


def skips_on_device(optimizer) -> bool:
    """Whether this optimizer skips its whole update when its `found_inf` flag on the device is set,
    without the host reading the flag: torch's fused Adam and AdamW (which also take their step
    counts back). Others (foreach, bitsandbytes' 8-bit) need the verdict on the host first."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))
