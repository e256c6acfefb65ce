"""Qwen2-VL: a ViT with 2x2 patch merging feeding a Qwen2 language model through M-RoPE.

Images keep their aspect ratio at any size that is a multiple of 28 pixels (14-pixel patches,
merged 2x2); each 28x28 block becomes one `<|image_pad|>` token between `<|vision_start|>` and
`<|vision_end|>`. The language layers are Qwen2's (multimodal RoPE only changes how the rotary
cos/sin are built, not how they are applied), so the qwen2 kernels fit them.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.models.vision.families._qwen import QwenVLFamilyBase


class Qwen2VLFamily(QwenVLFamilyBase):
    name = "qwen2_vl"
    display_name = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    language_model_type = "qwen2"

    def processor_class(self) -> Any:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor

    def tiny_config(self) -> Any:
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config=self.text_config(),
            vision_config=dict(
                depth=2,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                mlp_ratio=2,
                patch_size=self.patch_size,
                spatial_merge_size=self.merge_size,
                temporal_patch_size=2,
            ),
            tie_word_embeddings=False,
            **self.token_id_config(),
        )


FAMILY = Qwen2VLFamily()
