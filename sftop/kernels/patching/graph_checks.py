"""What the vision-language graph parts (vision_graphs.py, language_graphs.py) check before they
install, and per call: one set of rules for both, and the same ones the text model's cuda_graphs
part applies where they overlap."""

from __future__ import annotations

import functools
from collections.abc import Hashable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .. import compat
from ..constants import VISION_GRAPHS_ENV
from ..env import env_flag
from . import markers as M


def install_refusal(module: nn.Module) -> str | None:
    """ "stock: why" when CUDA graphs may not replay `module`'s work, else None."""
    from ..cuda_graphs import ENV_SWITCH, enabled_by_env, several_processes

    if not enabled_by_env():
        return f"stock: turned off by {ENV_SWITCH}=0"
    if not env_flag(VISION_GRAPHS_ENV, default=True):
        return f"stock: turned off by {VISION_GRAPHS_ENV}=0"
    if not torch.cuda.is_available():
        return "stock: CUDA graphs need a CUDA GPU"
    if several_processes():
        return "stock: not under multi-process training"
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"stock: dropout p={m.p} in {type(m).__name__} (a replayed graph would reuse one random mask)"
    return None


def plain_call(kwargs: dict, config) -> bool:
    """Nothing asked of a module but its output: no hidden states or attentions to record, nothing
    precomputed handed in (what the stock forward handles)."""
    if getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False):
        return False
    return all(v is None or v is False for v in kwargs.values())


def uncapturable_checkpoints(block: nn.Module) -> bool:
    """Whether `block` runs through checkpoints a captured step cannot take: reentrant ones, or any
    wrapper other than torch's non-reentrant checkpoint and sftop's own.

    A reentrant checkpoint's backward accumulates into the parameters' .grad itself and gives
    `torch.autograd.grad` nothing: a captured backward, which asks autograd.grad for the gradients,
    would hand out none and the adapters would silently stop learning.  transformers' offload
    (`gradient_checkpointing_enable(offload=True)`) wraps torch's checkpoint in `save_on_cpu`, which
    allocates pinned host memory for every saved tensor and waits on each copy: a capture fails on
    its first copy (measured on Qwen2.5-VL-3B, docs/benchmarks.md), so such a step runs eagerly."""
    if not getattr(block, "gradient_checkpointing", False):
        return False
    if M.STOCK_CHECKPOINT_FUNCTION in block.__dict__:
        return False  # sftop's own checkpoint function (lean or offloaded), non-reentrant only
    fn = compat.checkpoint_function(block)
    keywords = getattr(fn, "keywords", None)
    if not (isinstance(keywords, dict) and keywords.get("use_reentrant") is False):
        return True
    return getattr(fn, "func", None) is not torch_checkpoint


def call_modes(layout, block: nn.Module) -> tuple:
    """What a graph part's key adds to its call's own shapes, for both VLM parts alike: autocast,
    whether the layers checkpoint (`layout`, graph_layout.ModelLayout) and what their checkpoint
    function is made of (`block`: the first of them)."""
    return (
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        layout.checkpointing(),
        checkpoint_key(block),
    )


def checkpoint_key(block: nn.Module) -> Hashable:
    """What a captured step's key holds of `block`'s checkpoint function: the functions and
    settings it is made of, not the object itself.

    `gradient_checkpointing_enable` sets a fresh function on every call (transformers' partial of
    torch's checkpoint, or sftop's lean or offloaded one with new hooks), and preference tuning
    calls it again after every reference forward (TRL's DPOTrainer switches checkpointing off for
    that forward).  Keyed by the object, a checkpointed vision-language DPO run never saw a key
    twice, so it never captured.  An object inside the function (sftop's offload hooks) stands in
    by its `graph_key()`, the settings that change what a capture records (its host buffers are
    the captured step's own), or else by its type."""
    return _described(compat.checkpoint_function(block))


def _described(value) -> Hashable:
    if isinstance(value, functools.partial):
        keywords = tuple(sorted((k, _described(v)) for k, v in value.keywords.items()))
        return (_described(value.func), tuple(_described(a) for a in value.args), keywords)
    if value is None or isinstance(value, (bool, int, float, str)) or callable(value):
        return value  # a function or class is its own stable key
    graph_key = getattr(value, "graph_key", None)
    return graph_key() if callable(graph_key) else type(value).__qualname__
