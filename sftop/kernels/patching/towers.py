"""Which vision-tower patcher takes a vision-language model's tower: Qwen-VL's
(vision_tower.py) or SigLIP's (siglip_tower.py).  Each reports its own parts, "fused" or
"stock: why"; a model holding neither gets the Qwen-VL parts reported stock with the towers sftop
knows."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn


def apply_parts(
    parts: Sequence[str], patchers: dict[str, Callable[..., str]], towers: Sequence[tuple[Any, ...]]
) -> dict[str, str]:
    """Each part's patcher called on every tower (`towers`: the patcher's arguments per tower);
    one "fused" or "stock: why" per part, the towers' differing answers joined. A part that raises
    is reported stock and never takes the others down."""
    report = {}
    for part in parts:
        results = set()
        for args in towers:
            try:
                results.add(patchers[part](*args))
            except Exception as exc:  # noqa: BLE001 - a part that can't be applied must not take the others down
                results.add(f"stock: patch failed ({type(exc).__name__}: {exc})")
        report[part] = results.pop() if len(results) == 1 else "; ".join(sorted(results))
    return report


def patch_towers(model: nn.Module, *, enable: bool = True) -> dict[str, str]:
    """Patch (or, with `enable=False`, unpatch) the vision towers of `model` sftop knows."""
    from . import siglip_tower, vision_tower

    if siglip_tower.find_towers(model) and not vision_tower.find_towers(model):
        return siglip_tower.patch_siglip_tower(model, enable=enable)
    if vision_tower.find_towers(model) or not enable:
        return vision_tower.patch_vision_tower(model, enable=enable)
    known = ", ".join(sorted((*vision_tower.TOWERS, *siglip_tower.TOWER_CLASSES)))
    return {p: f"stock: no vision tower sftop knows (known: {known})" for p in vision_tower.VISION_PARTS}
