"""Part checkpoint_offload: `gradient_checkpointing_enable(offload=True)` (what Trainer calls for
sftop's "offload" plan) uses the copy-overlapping offload of sftop/kernels/checkpoint_offload.py
instead of transformers' save_on_cpu, which blocks on every copy."""

from __future__ import annotations

import torch
from torch import nn

from .. import checkpointing
from .. import markers as M
from ..forwards import FUSED
from ..part import Part
from ..registry import FamilySpec


def apply(model: nn.Module, spec: FamilySpec) -> str:
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"stock: {type(model).__name__} does not support gradient checkpointing"
    if not torch.cuda.is_available():
        return "stock: offloading to host memory needs a CUDA GPU"
    model.__dict__[M.OFFLOAD_OK] = True
    checkpointing.install(model)
    return FUSED


PART = Part("checkpoint_offload", apply, provides=(M.OFFLOAD_OK, M.GC_ENABLE), undo=checkpointing.uninstall)
