"""transformers' `model.zero_grad()` after every optimizer step, done over the optimizer's
parameters instead of the whole module tree.

Why: `nn.Module.zero_grad` walks every module to reach the parameters (about 1 ms for 885 modules
on a CPU; 11 ms a step with a profiler's stacks on a Llama-3.2-1B whole run, docs/benchmarks.md,
2026-12-07), and the GPU waits for it: the step before ended with the update guard's read-back.
A LoRA model's parameters with gradients are its adapters, which are exactly what the optimizer
holds: setting those gradients to None is the same result without the walk.

How: at the start of training the model's `zero_grad` is shadowed by the optimizer's own, which
clears the gradients of its parameters, but only where every parameter that requires a gradient is one of
them (otherwise the real walk runs, as before).  The optimizer is held weakly: after an
out-of-memory step-down the old trainer's optimizer and its states must be freed, and a model whose
optimizer is gone walks its modules again.
"""

from __future__ import annotations

import weakref

from torch import nn
from transformers import TrainerCallback

_SHADOW = "zero_grad"


def clear_through_optimizer(model: nn.Module, optimizer) -> bool:
    """Shadow `model.zero_grad` by `optimizer`'s own `zero_grad`; False (nothing changed) where a
    parameter that requires a gradient is not the optimizer's."""
    model.__dict__.pop(_SHADOW, None)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    if any(p.requires_grad and id(p) not in held for p in model.parameters()):
        return False
    alive = weakref.ref(inner)
    walk = type(model).zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        torch_optimizer = alive()
        if torch_optimizer is None:
            walk(model, set_to_none)
        else:
            torch_optimizer.zero_grad(set_to_none=set_to_none)

    model.__dict__[_SHADOW] = zero_grad
    return True


class OptimizerZeroGrad(TrainerCallback):
    """Installs `clear_through_optimizer` when training starts (the optimizer exists by then)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None and optimizer is not None:
            clear_through_optimizer(model, optimizer)
