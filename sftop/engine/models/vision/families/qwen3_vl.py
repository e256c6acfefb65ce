"""Qwen3-VL: a ViT on 16-pixel patches merged 2x2 (32-pixel blocks), whose intermediate features
are also added into the first language layers ("deepstack"), feeding a Qwen3 language model.

Same image tokens as Qwen2-VL; ChatML without a default system turn. The language layers are
Qwen3's (q/k norms; the interleaved multimodal RoPE is built into the rotary cos/sin), so the qwen3
kernels fit them.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._qwen import QwenVLFamilyBase


class Qwen3VLFamily(QwenVLFamilyBase):
    name = "qwen3_vl"
    display_name = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    language_model_type = "qwen3"
    patch_size = 16
    default_system = None
    # 32-pixel blocks. Default budget: at most 512 image tokens per image (524,288 px, about
    # 724x724), at least 4 (4,096 px); aspect ratios over 200 refused.
    image_rules = ImageRules(
        patch_multiple=32, min_edge=32, max_pixels=512 * 32 * 32, min_pixels=4 * 32 * 32, max_aspect_ratio=200.0
    )

    def processor_class(self) -> Any:
        from transformers import Qwen3VLProcessor

        return Qwen3VLProcessor

    def tiny_config(self) -> Any:
        from transformers import Qwen3VLConfig

        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        return Qwen3VLConfig(
            text_config=self.text_config(head_dim=16, rope_parameters=rope),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=self.patch_size,
                spatial_merge_size=self.merge_size,
                temporal_patch_size=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
            tie_word_embeddings=False,
            **self.token_id_config(),
        )


FAMILY = Qwen3VLFamily()
