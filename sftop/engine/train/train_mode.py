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
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def training_everywhere(model: nn.Module) -> bool:
    return all(m.training for m in model.modules())


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
