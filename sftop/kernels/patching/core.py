"""patch_model and unpatch: run the registered patch parts (patching/parts/, in the order their
declarations resolve to) on a model, and take them all off again."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .._runtime import kernels_available
from .forwards import FUSED, restore_forward, unwrap_peft
from .parts import ORDER
from .registry import FAMILIES, MULTIMODAL

PARTS = tuple(part.name for part in ORDER)

__all__ = ["FUSED", "PARTS", "PatchReport", "patch_model", "unpatch"]


@dataclass
class PatchReport:
    family: str
    parts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def any_fused(self) -> bool:
        return any(v == FUSED for v in self.parts.values())


def unpatch(model: nn.Module) -> None:
    """Take every part off `model` (an HF model, possibly inside a PeftModel): module forwards,
    the markers the parts left, the checkpoint functions on the layers, the attention backend."""
    base = unwrap_peft(model)
    for m in base.modules():
        restore_forward(m)
    for part in reversed(ORDER):
        if part.undo is not None:
            part.undo(base)


def patch_model(
    model: nn.Module, *, enable: bool = True, model_type: str | None = None, only: tuple[str, ...] | None = None
) -> PatchReport:
    """Patch `model` (an HF causal LM, possibly inside a PeftModel) in place with the fused kernels.

    Returns which parts were fused and, for the others, why they stayed stock.  `enable=False`
    removes any earlier patch from this model (`unpatch`) and reports every part as stock.

    A vision-language model names its text layers' family in `model_type` (its own config's
    model_type names the whole model): the parts find those layers by class name wherever they
    sit, unless a family file describes that model's language layers (`registry.MULTIMODAL`, by
    its own model_type), which then wins. `only` limits patching to those parts; the others stay
    stock with that reason.
    """
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    family = model_type or getattr(config, "model_type", None) or type(base).__name__
    if not enable:
        unpatch(base)
        return PatchReport(family, {p: "stock: disabled" for p in PARTS})
    ok, why = kernels_available()
    if not ok:
        return PatchReport(family, {p: f"stock: {why}" for p in PARTS})
    spec = MULTIMODAL.get(str(getattr(config, "model_type", ""))) or FAMILIES.get(family)
    if spec is None:
        why = f"family '{family}' not supported (supported: {', '.join(sorted(FAMILIES))})"
        return PatchReport(family, {p: f"stock: {why}" for p in PARTS})
    parts = {}
    for part in ORDER:
        if only is not None and part.name not in only:
            parts[part.name] = "stock: not applied to this model (see its kernels report)"
            continue
        try:
            parts[part.name] = part.apply(base, spec)
        except Exception as exc:  # noqa: BLE001 - a part that can't be applied must not take the others down
            parts[part.name] = f"stock: patch failed ({type(exc).__name__}: {exc})"
    return PatchReport(family, parts)
