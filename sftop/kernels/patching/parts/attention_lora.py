"""Part attention_lora: the q/k/v LoRA layers of every `<Family>Attention` compute all three
projections in one LoRAQKVFunction (sftop/kernels/lora_linear.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import markers as M
from ..forwards import FUSED, commonest_refusal, family_modules, set_forward
from ..part import Part
from ..peft_lora import base_refusal, is_lora_layer, lora_refusal, lora_state_ok
from ..registry import FamilySpec
from .lora import lora_forward
from .rope import rope_active


class QKVGroup:
    """q/k/v LoRA layers of one attention block.  HF's attention calls q_proj(x), k_proj(x) and
    v_proj(x) on the same tensor; the first call computes all three in one LoRAQKVFunction and
    leaves the other two outputs here, each handed out once to its own layer when that layer is
    called with the very same tensor object.  Any other call computes afresh, so a stale entry can
    never be returned for a different input.  `keep_projections` (part kept_projections): inside
    an offloading checkpoint, open a holder the attention fills with q/k/v for the recomputation."""

    __slots__ = ("layers", "adapter", "x", "pending", "keep_projections")

    def __init__(self, layers, adapter):
        self.layers, self.adapter, self.x, self.pending = layers, adapter, None, {}
        self.keep_projections = False


def _forward(self, orig, x, *args, **kwargs):
    grp = self.__dict__[M.QKV_GROUP]
    if args or kwargs or not all(lora_state_ok(m, grp.adapter) for m in grp.layers):
        grp.x, grp.pending = None, {}
        return lora_forward(self, orig, x, *args, **kwargs)
    if grp.x is x and id(self) in grp.pending:
        out = grp.pending.pop(id(self))
        if not grp.pending:
            grp.x = None
        return out
    from ...lora_linear import lora_linears
    from ...recompute import open_kept_projections

    # only with the fused RoPE, which passes the recomputation's placeholders on uncomputed
    kept = open_kept_projections() if grp.keep_projections and rope_active() else None
    outs = lora_linears(x, grp.layers, grp.adapter, kept=kept)
    grp.x = x
    grp.pending = {id(m): o for m, o in zip(grp.layers, outs) if m is not self}
    return outs[[m is self for m in grp.layers].index(True)]


def _refusal(attn: nn.Module) -> str | None:
    projs: list[Any] = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(p is not None and is_lora_layer(p) for p in projs):
        return "q/k/v are not all PEFT LoRA layers"
    for p in projs:
        why = lora_refusal(p) or base_refusal(p.base_layer, allow_bias=True)
        if why:
            return why
    if len({p.active_adapters[0] for p in projs}) != 1:
        return "different adapters on q/k/v"
    if (
        len({p.base_layer.weight.shape[-1] for p in projs if getattr(p.base_layer.weight, "quant_state", None) is None})
        > 1
    ):
        return "q/k/v have different input sizes"
    return None


def apply(model: nn.Module, spec: FamilySpec) -> str:
    mods = family_modules(model, spec, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    refused = commonest_refusal(mods, _refusal, "attention blocks")
    if refused:
        return refused
    for m in mods:
        layers = (m.q_proj, m.k_proj, m.v_proj)
        grp = QKVGroup(layers, m.q_proj.active_adapters[0])
        for p in layers:
            p.__dict__[M.ADAPTER] = grp.adapter
            p.__dict__[M.DIRECT] = True
            p.__dict__[M.QKV_GROUP] = grp
            set_forward(p, _forward, "attention_lora")
    return FUSED


# after lora, whose forward it replaces on q/k/v (and falls back to per call)
PART = Part("attention_lora", apply, requires=("lora",), provides=(M.QKV_GROUP,))
