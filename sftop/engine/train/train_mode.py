"""transformers' per-micro-batch `model.train()`, skipped where every module is training already.

Why: `Trainer.training_step` calls `model.train()` on every micro-batch.  `nn.Module.train` recurses
through every module in Python, 8.5-10 ms for a 32-layer LoRA model (2,665 modules, measured on a
CPU), and the GPU waits for it: the step before ended with a read-back (the update guard's), so
nothing is queued while the host walks the modules (a profiled Llama-3.1-8B NF4 DPO step,
docs/benchmarks.md, 2026-12-07).  Reading each module's `training` flag costs about a third of
that (3.1 ms against 8.5 on the same CPU and model).

How: where every module already trains, the model's `train` is shadowed by a no-op for the length of
the step; where any module is in evaluation mode (after an evaluation, or one a library switched
off), the real `train()` runs as before.

The flags are read off a flat list of the model's modules, made once and made again whenever any
module anywhere gains a submodule (torch's global registration hook: `add_module`, attribute
assignment, ModuleList and ModuleDict all go through it).  Walking the tree on every micro-batch
was itself one of the walks the GPU waited for between steps (about 1 ms for 885 modules on a CPU,
against 0.1 ms for the list; a profiled Llama-3.2-1B whole run, docs/benchmarks.md, 2026-12-07).
A module removed from the tree stays in the list; if it is in evaluation mode the real `train()`
runs, which is never wrong, only slower.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

# bumped whenever any module gains a submodule: every cached list older than it is made again
_registrations = 0
_module_lists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (registrations, modules)


def _count_registration(parent, name, module):
    global _registrations
    _registrations += 1
    return None  # the module registered as given


register_module_module_registration_hook(_count_registration)


def _modules_of(model: nn.Module) -> list[nn.Module]:
    cached = _module_lists.get(model)
    if cached is None or cached[0] != _registrations:
        cached = (_registrations, list(model.modules()))
        _module_lists[model] = cached
    return cached[1]


def training_everywhere(model: nn.Module) -> bool:
    return all(m.training for m in _modules_of(model))


@contextlib.contextmanager
def train_call_skipped(model: nn.Module) -> Iterator[None]:
    """Inside: `model.train()` (mode True) returns at once where every module trains already."""
    if "train" in model.__dict__ or not training_everywhere(model):
        yield
        return
    real = model.train

    def train(mode: bool = True):
        return model if mode else real(mode)

    model.__dict__["train"] = train
    try:
        yield
    finally:
        model.__dict__.pop("train", None)
