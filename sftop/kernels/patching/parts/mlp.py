"""Part mlp: `<Family>MLP` runs the fused GLU activation (sftop/kernels/glu.py), or, when gate, up
and down are eligible PEFT LoRA layers, the whole MLP as one LoRAMLPFunction (lora_mlp.py)."""

from __future__ import annotations

from torch import nn

from .. import markers as M
from ..forwards import FUSED, family_modules, set_forward
from ..part import Part
from ..peft_lora import base_refusal, is_lora_layer, lora_refusal
from ..registry import FamilySpec


def glu_kind(act: nn.Module) -> int | None:
    """Which fused activation reproduces `act` exactly, by class (names differ across HF releases)."""
    from ...glu import GEGLU, SWIGLU

    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return SWIGLU
    # GELUTanh is gelu_pytorch_tanh; NewGELUActivation (gelu_new) is the same tanh formula
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation") or (
        isinstance(act, nn.GELU) and act.approximate == "tanh"
    ):
        return GEGLU
    return None


def lora_mlp_refusal(mlp: nn.Module) -> str | None:
    """Why this MLP can't take the one-Function LoRA path (it then keeps the fused activation)."""
    projs = [getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(is_lora_layer(p) for p in projs):
        return "gate/up/down are not all PEFT LoRA layers"
    for p in projs:
        why = lora_refusal(p)
        if why:
            return why
    if len({p.active_adapters[0] for p in projs}) != 1:
        return "different adapters on gate/up/down"
    for p in projs:
        why = base_refusal(p.base_layer, allow_bias=False)
        if why:
            return why
    return None


def _forward(self, _orig, x):
    from ...glu import GLUFunction
    from ...lora_mlp import lora_mlp
    from ...recompute import current_layer_run

    d = self.__dict__
    adapter = d.get(M.LORA_MLP_ADAPTER)
    if adapter is not None:
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        # PEFT's per-call state (disabled, merged, switched adapter) sends us down the module path
        if all(not p.disable_adapters and not p.merged and list(p.active_adapters) == [adapter] for p in projs):
            # under lean_recompute's checkpoint function: which run of its layer this is
            return lora_mlp(x, *projs, d[M.GLU], adapter, current_layer_run())
    return self.down_proj(GLUFunction.apply(self.gate_proj(x), self.up_proj(x), d[M.GLU]))


def apply(model: nn.Module, spec: FamilySpec) -> str:
    mods = family_modules(model, spec, spec.mlp_class)
    if not mods:
        return f"stock: no {spec.mlp_class} modules found"
    kinds = []
    for m in mods:
        if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"stock: {spec.mlp_class} is not a gate/up/down MLP"
        kind = glu_kind(m.act_fn)
        if kind is None:
            return f"stock: activation {type(m.act_fn).__name__} has no fused kernel"
        kinds.append(kind)
    for m, kind in zip(mods, kinds):
        m.__dict__[M.GLU] = kind
        m.__dict__[M.LORA_MLP_ADAPTER] = m.gate_proj.active_adapters[0] if lora_mlp_refusal(m) is None else None
        set_forward(m, _forward, "mlp")
    return FUSED


PART = Part("mlp", apply, provides=(M.LORA_MLP_ADAPTER,))
