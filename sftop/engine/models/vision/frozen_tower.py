"""A frozen vision tower runs its forward without autograd.

transformers' `enable_input_require_grads`, which the trainer calls with gradient checkpointing on
a LoRA model, marks the output of every sub-model's input embedding as needing a gradient: the
language model's token embeddings (where reentrant checkpoints need it) and also the vision
tower's patch embedding.  With the tower frozen (the default LoRA parts adapt the language model
only) that gradient reaches no trainable weight, yet autograd keeps the tower's saved tensors (its
blocks' inputs under checkpointing, every activation without) and runs the tower's whole backward
each step: a recomputation of every block and their input gradients, for nothing.

Here each tower (a sub-model whose input embedding is not the language model's) gets a forward
pre-hook that, when none of the tower's parameters needs a gradient at that moment, runs its
forward with autograd off, and a forward hook (run even when the forward raises) that puts the grad
mode back.  The tower's output then carries no graph; the projector after it (outside the tower, or
Qwen-VL's merger inside it, which makes that tower count as trained) still learns.  The check runs
per call, so a tower whose adapters are switched on later (or a LoRA part on it) trains as usual.
"""

from __future__ import annotations

import torch
from torch import nn

_STATE = "_sftop_frozen_tower_grad"  # the grad mode a skipped forward turned off, per tower
_HANDLES = "_sftop_frozen_tower_hooks"


def vision_towers(model: nn.Module) -> list[nn.Module]:
    """The sub-models of a VLM that `enable_input_require_grads` hooks besides the language model:
    those with input embeddings of their own."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        text_embeddings = base.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return []
    towers: list[nn.Module] = []
    for m in base.modules():
        if m is base or not isinstance(m, PreTrainedModel):
            continue
        try:
            embeddings = m.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if embeddings is None or embeddings is text_embeddings:
            continue
        if any(m is t or _contains(t, m) for t in towers):
            continue  # a tower's own sub-model
        towers.append(m)
    return towers


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(sub is inner for sub in outer.modules())


def _frozen(tower: nn.Module) -> bool:
    return not any(p.requires_grad for p in tower.parameters())


def _before(tower: nn.Module, _args) -> None:
    if torch.is_grad_enabled() and _frozen(tower):
        tower.__dict__[_STATE] = True
        torch.set_grad_enabled(False)


def _after(tower: nn.Module, _args, _output) -> None:
    if tower.__dict__.pop(_STATE, False):
        torch.set_grad_enabled(True)


def install(model: nn.Module) -> str:
    """Hook every vision tower of `model` (idempotent); the report line for the run's kernels."""
    towers = vision_towers(model)
    for tower in towers:
        if _HANDLES in tower.__dict__:
            continue
        tower.__dict__[_HANDLES] = (
            tower.register_forward_pre_hook(_before),
            tower.register_forward_hook(_after, always_call=True),
        )
    if not towers:
        return "off: no vision tower with input embeddings of its own"
    return "on: a frozen vision tower runs its forward without autograd (no backward through it)"


def uninstall(model: nn.Module) -> None:
    for tower in vision_towers(model):
        for handle in tower.__dict__.pop(_HANDLES, ()):
            handle.remove()
