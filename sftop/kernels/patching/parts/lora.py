"""Part lora: every eligible PEFT LoRA linear runs one LoRALinearFunction (sftop/kernels/lora_linear.py)
over a frozen dense or NF4 base, or its base layer then the adapter product in the base's compute dtype."""

from __future__ import annotations

import torch
from torch import nn

from ... import compat
from .. import markers as M
from ..forwards import FUSED, commonest_refusal, set_forward
from ..part import Part
from ..peft_lora import base_refusal, lora_layers, lora_refusal, lora_state_ok
from ..registry import FamilySpec


def lora_forward(self, orig, x, *args, **kwargs):
    d = self.__dict__
    name = d[M.ADAPTER]
    # anything PEFT decides per call (mixed adapter batches, disabled or merged adapters, a
    # switched adapter) goes back to PEFT
    if kwargs.get("adapter_names") is not None or not lora_state_ok(self, name):
        return orig(x, *args, **kwargs)
    if d.get(M.DIRECT) and not args and not kwargs:
        from ...lora_linear import lora_linears

        return lora_linears(x, (self,), name)
    result = self.base_layer(x, *args, **kwargs)
    a, b, scale = compat.lora_weights(self, name)
    # PEFT keeps adapters in fp32 and runs them (and the residual add) in fp32 without tensor
    # cores; the adapter product is computed here in the base layer's compute dtype instead, and
    # scale-and-add folds into one addmm when dtypes line up.
    dt = getattr(self.base_layer, "compute_dtype", None) or result.dtype
    xa = x.to(dt) @ a.to(dt).t()
    b_t = b.to(dt).t()
    if result.dtype == dt:
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), b_t, alpha=scale)
        return flat.view(result.shape)
    return result + (xa @ b_t) * scale


def apply(model: nn.Module, spec: FamilySpec) -> str:
    layers = lora_layers(model)
    if not layers:
        return "stock: no PEFT LoRA layers"
    refused = commonest_refusal(layers, lora_refusal, "layers")
    if refused:
        return refused
    for m in layers:
        m.__dict__[M.ADAPTER] = m.active_adapters[0]
        # a dense or NF4 frozen base runs inside LoRALinearFunction (one Function, x read once);
        # anything else (8-bit, trainable base) keeps the base layer's own forward
        m.__dict__[M.DIRECT] = base_refusal(m.base_layer, allow_bias=True) is None
        set_forward(m, lora_forward, "lora")
    return FUSED


PART = Part("lora", apply, provides=(M.ADAPTER, M.DIRECT))
