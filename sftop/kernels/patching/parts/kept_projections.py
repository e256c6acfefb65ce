"""Part kept_projections: under offloaded lean checkpointing, each layer's first run keeps its
attention's q/k/v in host memory, so that the recomputation skips the q/k/v projections and RoPE
(recompute.py KeptProjections), on layers whose compute hides the extra copies."""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import markers as M
from ..forwards import FUSED, family_modules
from ..part import Part
from ..registry import FamilySpec


def apply(model: nn.Module, spec: FamilySpec) -> str:
    from ...constants import KEEP_PROJECTIONS_ENV as ENV_SWITCH
    from ...constants import projections_worth_keeping

    if not spec.qkv_straight_to_rope:
        return f"stock: {spec.model_type} normalises q and k before RoPE, and that backward reads them"
    if not model.__dict__.get(M.LEAN):
        return "stock: needs lean_recompute"
    mods = family_modules(model, spec, spec.attention_class)
    groups: list[Any] = [getattr(m, "q_proj", None) and m.q_proj.__dict__.get(M.QKV_GROUP) for m in mods]
    if not mods or not all(groups):
        return "stock: needs the fused q/k/v LoRA projections (part attention_lora)"
    if not all(m.__dict__.get(M.PART) == "rope" for m in mods):
        return "stock: needs the fused RoPE (part rope)"
    config = model.config
    q, kv = mods[0].q_proj.base_layer, mods[0].k_proj.base_layer
    intermediate = getattr(config, "intermediate_size", None)
    if not intermediate:
        return "stock: the config gives no intermediate_size"
    if not projections_worth_keeping(q.in_features, intermediate, q.out_features, kv.out_features):
        return f"stock: layers too narrow to hide the extra copies under their compute ({ENV_SWITCH}=1 forces it)"
    if not model.__dict__.get(M.OFFLOAD_OK):
        return "stock: needs checkpoint_offload"
    for grp in groups:
        grp.keep_projections = True
    return FUSED


# the flag lives on the q/k/v groups, which unpatch drops with the projections' forwards
PART = Part("kept_projections", apply, requires=("rope", "attention_lora", "lean_recompute", "checkpoint_offload"))
