"""Which PEFT LoRA layers the fused paths may take over (shared by the mlp, lora and
attention_lora parts)."""

from __future__ import annotations

import torch
from torch import nn

from .. import compat


def is_lora_layer(m: nn.Module) -> bool:
    return compat.is_peft_lora_layer(m)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_lora_layer(m)]


def lora_refusal(m: nn.Module) -> str | None:
    """Why this LoRA layer must keep PEFT's own forward, or None when the fast path is exact."""
    active = list(getattr(m, "active_adapters", []))
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    if name not in m.lora_A:
        return "adapter not on this layer"
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        return "DoRA or another LoRA variant"
    if not isinstance(m.lora_dropout[name], nn.Identity):
        return "LoRA dropout > 0"
    if m.lora_A[name].bias is not None or m.lora_B[name].bias is not None:
        return "LoRA bias"
    if type(m.lora_A[name]) is not nn.Linear or type(m.lora_B[name]) is not nn.Linear:
        return f"LoRA matrices are {type(m.lora_A[name]).__name__}"
    return None


def base_refusal(base: nn.Module, allow_bias: bool) -> str | None:
    """Why a LoRA layer's base can't be multiplied directly (dense or NF4 weight, frozen)."""
    if type(base).__name__ not in ("Linear", "Linear4bit") or not isinstance(
        getattr(base, "weight", None), torch.Tensor
    ):
        return f"base layer {type(base).__name__}"
    if not allow_bias and getattr(base, "bias", None) is not None:
        return "base layer has a bias"
    if base.weight.requires_grad:
        return "base weights are trainable"
    if (
        base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        and getattr(base.weight, "quant_state", None) is None
    ):
        return f"base weight dtype {base.weight.dtype}"
    return None


def lora_state_ok(m: nn.Module, adapter: str) -> bool:
    """False when PEFT decides something per call (disabled or merged adapters, a switched adapter)."""
    active = m.active_adapters
    return not m.disable_adapters and not m.merged and len(active) == 1 and active[0] == adapter
