"""Part lean_recompute: under gradient checkpointing, the fused LoRA MLP skips its down projection
when a layer is recomputed for backward: that output is never used (sftop/kernels/recompute.py)."""

from __future__ import annotations

from torch import nn

from .. import checkpointing
from .. import markers as M
from ..forwards import FUSED, family_modules
from ..part import Part
from ..registry import FamilySpec


def apply(model: nn.Module, spec: FamilySpec) -> str:
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"stock: {type(model).__name__} does not support gradient checkpointing"
    if not spec.mlp_output_unsaved:
        return f"stock: {spec.model_type} normalises the MLP output, so backward needs it"
    if not any(m.__dict__.get(M.LORA_MLP_ADAPTER) for m in family_modules(model, spec, spec.mlp_class)):
        return "stock: needs the fused LoRA MLP (mlp part with LoRA on gate, up and down)"
    model.__dict__[M.LEAN] = True
    checkpointing.install(model)
    return FUSED


PART = Part("lean_recompute", apply, requires=("mlp",), provides=(M.LEAN, M.GC_ENABLE), undo=checkpointing.uninstall)
