"""LoRA targets chosen by part (`lora.parts`): language / vision / projector, attention / mlp.

A VLM holds three groups of linear layers (the language model, the vision tower, the projector
between them). Users pick which to adapt by part instead of listing module names; the family says
where each part lives (`VisionFamily.lora_targets`), and this module turns the choice into one
regular expression that PEFT matches against full module names.
"""

from __future__ import annotations

from typing import Iterable

from sftop.engine.errors import PresetError
from sftop.engine.models.vision.family import LORA_PARTS, VisionFamily

LOCATION_PARTS = ("language", "vision", "projector")
KIND_PARTS = ("attention", "mlp")


def resolve_parts(family: VisionFamily, parts: Iterable[str] | None) -> tuple[str, ...]:
    """The parts to adapt: the preset's `lora.parts`, or the family's default when unset."""
    chosen = tuple(parts) if parts is not None else tuple(family.default_lora_parts)
    unknown = [p for p in chosen if p not in LORA_PARTS]
    if unknown:
        raise PresetError(
            f"Unknown LoRA part(s) {', '.join(unknown)}",
            where="lora.parts",
            hint=f"Choose among {', '.join(LORA_PARTS)}",
        )
    if not any(p in LOCATION_PARTS for p in chosen):
        raise PresetError(
            f"lora.parts = {list(chosen)} names no part of the model to adapt",
            where="lora.parts",
            hint=f'Add at least one of {", ".join(LOCATION_PARTS)} (e.g. ["language", "attention", "mlp"])',
        )
    return chosen


def target_regex(family: VisionFamily, parts: Iterable[str] | None) -> str:
    """One `re.fullmatch` pattern for PEFT's `target_modules`.

    A module is adapted when it lies in a chosen location (language, vision, projector) and, for
    the language model and vision tower, is of a chosen kind (attention, mlp) when any kind is
    chosen. The projector has no attention or MLP of its own: choosing it adapts all its linears.
    """
    chosen = resolve_parts(family, parts)
    targets = family.lora_targets
    kinds = [targets.pattern(k) for k in KIND_PARTS if k in chosen]
    kind = "|".join(f"(?:{k})" for k in kinds)
    alternatives = []
    for location in LOCATION_PARTS:
        if location not in chosen:
            continue
        where = targets.pattern(location)
        if location == "projector" or not kind:
            alternatives.append(f"(?:{where})")
        else:
            # both must hold of the same name: a lookahead for the location, then the kind
            alternatives.append(f"(?=(?:{where})$)(?:{kind})")
    return "|".join(alternatives)


def describe_parts(family: VisionFamily, parts: Iterable[str] | None) -> str:
    """A one-line summary for `sftop presets show` and the run log."""
    chosen = resolve_parts(family, parts)
    default = " (the family's default)" if parts is None else ""
    return f"{', '.join(chosen)}{default}"


def parts_summary(preset) -> str | None:
    """`sftop presets show`'s comment on a VLM preset: the LoRA parts in effect and the family default."""
    from sftop.engine.models.vision.detect import family_on_disk

    family = family_on_disk(preset.model.name)
    if family is None:
        return None
    chosen = describe_parts(family, preset.lora.parts)
    return (
        f"{family.display_name} vision-language model: lora.parts = {chosen}; "
        f"family default {list(family.default_lora_parts)}; choose among {list(LORA_PARTS)}"
    )


def target_module_names(model, family: VisionFamily, parts: Iterable[str] | None) -> list[str]:
    """The linear layers of `model` the chosen parts cover, by full name (PEFT's `target_modules`).

    Matching only linear layers: a part's location pattern also covers its norms and embeddings,
    which LoRA cannot adapt.
    """
    import re

    from torch import nn

    pattern = re.compile(target_regex(family, parts))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    if not names:
        raise PresetError(
            f"lora.parts = {list(resolve_parts(family, parts))} matches no linear layer of this "
            f"{family.display_name} model",
            where="lora.parts",
            hint=f"Choose other parts, e.g. {list(family.default_lora_parts)} (the family's default)",
        )
    return names
