"""Qwen2.5-VL: Qwen2-VL's layout with a windowed-attention ViT whose blocks use gated MLPs.

Same grid (14-pixel patches merged 2x2 into 28-pixel blocks), same image tokens, same ChatML
template with a default system turn. The language layers are Qwen2's under their own class names:
sftop/kernels/patching/families/qwen_vl.py describes them for the kernels.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.models.vision.families._qwen import QwenVLFamilyBase


class Qwen25VLFamily(QwenVLFamilyBase):
    name = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    language_model_type = "qwen2"

    def processor_class(self) -> Any:
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor

    def tiny_config(self) -> Any:
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=self.text_config(),
            # window_size is in pixels: 56 = a 2x2 window of merged blocks; block 1 attends fully.
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=self.patch_size,
                spatial_merge_size=self.merge_size,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            tie_word_embeddings=False,
            **self.token_id_config(),
        )


FAMILY = Qwen25VLFamily()
