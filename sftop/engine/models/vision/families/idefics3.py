"""Idefics3 (and the first SmolVLM releases, which are Idefics3 checkpoints): a SigLIP tower on
364-pixel tiles, pixel-shuffled into 169 tokens per tile, feeding a Llama. See `_idefics`."""

from __future__ import annotations

from typing import Any

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._idefics import IdeficsFamilyBase


class Idefics3Family(IdeficsFamilyBase):
    name = "idefics3"
    display_name = "Idefics3 / SmolVLM"
    model_types = ("idefics3",)
    # 364-pixel tiles. Default budget 728x728 (529,984 px): at most 2x2 tiles plus the global view,
    # 5 x 171 + 1 = 856 tokens per image at most (the processor's own default, 4x4 tiles, costs
    # about 2,900).
    image_rules = ImageRules(patch_multiple=364, min_edge=14, max_pixels=728 * 728, min_pixels=14 * 14)

    def processor_class(self) -> Any:
        from transformers import Idefics3Processor

        return Idefics3Processor

    def image_processor_class(self) -> Any:
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        return Idefics3ImageProcessorPil

    def config_class(self) -> Any:
        from transformers import Idefics3Config

        return Idefics3Config


FAMILY = Idefics3Family()
