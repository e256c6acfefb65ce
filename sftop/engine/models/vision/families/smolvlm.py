"""SmolVLM2 (`smolvlm`): Idefics3's layout with smaller tiles (512 pixels and 64 tokens each for
the 256M/500M models, 384 and 81 for the 2.2B), feeding a small Llama. See `_idefics`. Its
processor also takes a video processor; sftop builds it without one (images only)."""

from __future__ import annotations

from typing import Any

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._idefics import IdeficsFamilyBase
from sftop.engine.models.vision.families._offline import image_only


class SmolVLMFamily(IdeficsFamilyBase):
    name = "smolvlm"
    display_name = "SmolVLM2"
    model_types = ("smolvlm",)
    # 512-pixel tiles (the 256M/500M models; the 2.2B's are 384). Default budget 1536x1536
    # (2,359,296 px): at most 3x3 tiles plus the global view, 9 x 66 + 67 = 661 tokens per
    # image at most for 64-token tiles.
    image_rules = ImageRules(patch_multiple=512, min_edge=16, max_pixels=1536 * 1536, min_pixels=16 * 16)

    def processor_class(self) -> Any:
        from transformers import SmolVLMProcessor

        return image_only(SmolVLMProcessor)

    def image_processor_class(self) -> Any:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        return SmolVLMImageProcessorPil

    def config_class(self) -> Any:
        from transformers import SmolVLMConfig

        return SmolVLMConfig


FAMILY = SmolVLMFamily()
