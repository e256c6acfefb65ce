"""Which vision-tower patcher takes a vision-language model's tower: Qwen-VL's
(vision_tower.py) or SigLIP's (siglip_tower.py).  Each reports its own parts, "fused" or
"stock: why"; a model holding neither gets the Qwen-VL parts reported stock with the towers sftop
knows."""

from __future__ import annotations

from torch import nn


def patch_towers(model: nn.Module, *, enable: bool = True) -> dict[str, str]:
    """Patch (or, with `enable=False`, unpatch) the vision towers of `model` sftop knows."""
    from . import siglip_tower, vision_tower

    if siglip_tower.find_towers(model) and not vision_tower.find_towers(model):
        return siglip_tower.patch_siglip_tower(model, enable=enable)
    if vision_tower.find_towers(model) or not enable:
        return vision_tower.patch_vision_tower(model, enable=enable)
    known = ", ".join(sorted((*vision_tower.TOWERS, *siglip_tower.TOWER_CLASSES)))
    return {p: f"stock: no vision tower sftop knows (known: {known})" for p in vision_tower.VISION_PARTS}
