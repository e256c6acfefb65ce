"""Part attention: SDPA becomes flash attention over row boundaries for padding-free batches
(sftop/kernels/varlen_attention.py); everything else keeps running through SDPA."""

from __future__ import annotations

import torch
from torch import nn

from ... import compat
from .. import markers as M
from ..forwards import FUSED, family_modules, quantised_compute_dtype
from ..part import Part
from ..registry import FamilySpec


def apply(model: nn.Module, spec: FamilySpec) -> str:
    from ...varlen_attention import NAME, config_supported, packed_attention_config, register, varlen_available

    if not spec.packed_attention:
        why = (
            spec.packed_attention_refusal or f"{spec.model_type}'s position ids are not ones the packed attention reads"
        )
        return f"stock: {why}"
    # a VLM a family file describes: its language model only (its vision tower keeps its own attention)
    config = packed_attention_config(model.config)
    vlm_text = config is not model.config
    current = compat.attn_implementation(config)
    if current == NAME:
        return FUSED
    if current != "sdpa":
        return f"stock: attention is {current!r}; only SDPA is replaced"
    ok, why = varlen_available()
    if not ok:
        return f"stock: {why}"
    mods = family_modules(model, spec, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    dtype = quantised_compute_dtype(model) or getattr(model, "dtype", None)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    ok, why = config_supported(config, names.get(dtype, str(dtype)))
    if not ok:
        return f"stock: {why}"
    for m in mods:  # what the config says, checked where it is used
        if (
            getattr(m, "sliding_window", None)
            or getattr(m, "attention_dropout", 0.0)
            or not getattr(m, "is_causal", True)
        ):
            return "stock: sliding-window, dropout or non-causal attention in a layer"
    register()
    model.__dict__[M.ATTN_IMPLEMENTATION] = (current, vlm_text)
    model.set_attn_implementation({"text_config": NAME} if vlm_text else NAME)
    return FUSED


def undo(model: nn.Module) -> None:
    saved = model.__dict__.pop(M.ATTN_IMPLEMENTATION, None)
    if saved is not None:
        original, vlm_text = saved
        model.set_attn_implementation({"text_config": original} if vlm_text else original)


PART = Part("attention", apply, provides=(M.ATTN_IMPLEMENTATION,), undo=undo)
