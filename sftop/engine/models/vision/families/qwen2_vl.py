"""Qwen2-VL: a ViT with 2x2 patch merging feeding a Qwen2 language model through M-RoPE.

Images keep their aspect ratio at any size that is a multiple of 28 pixels (14-pixel patches,
merged 2x2); each 28x28 block becomes one `<|image_pad|>` token between `<|vision_start|>` and
`<|vision_end|>`. The language layers are Qwen2's (multimodal RoPE only changes how the rotary
cos/sin are built, not how they are applied), so the qwen2 kernels fit them.
"""

from __future__ import annotations

from typing import Any, Mapping

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._offline import build_tokenizer, image_only, token_ids
from sftop.engine.models.vision.family import LoraTargets, VisionFamily

SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
IDS = token_ids(SPECIALS)
VOCAB_SIZE = 400

# The Qwen2-VL turn format: ChatML with a default system turn, each image rendered as
# <|vision_start|><|image_pad|><|vision_end|> where it stands in the message.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Module names of Qwen2VLForConditionalGeneration (transformers 5):
#   model.language_model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}
#   model.visual.blocks.N.{attn.{qkv,proj}, mlp.{fc1,fc2}}
#   model.visual.merger.mlp.{0,2}  (the projector into the language model)
QWEN_VL_LORA = LoraTargets(
    language=r"model\.language_model\.layers\.\d+\..*",
    vision=r"model\.visual\.blocks\.\d+\..*",
    projector=r"model\.visual\.merger\..*",
    attention=r".*\.(self_attn\.(q|k|v|o)_proj|attn\.(qkv|proj))",
    mlp=r".*\.mlp\.((gate|up|down)_proj|fc1|fc2|linear_fc1|linear_fc2|0|2)",
)


class QwenVLFamilyBase(VisionFamily):
    """What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share: pixel-budget images on a merged patch grid."""

    supports_multiple_images = True
    supports_system_turn = True
    patch_size = 14
    merge_size = 2
    image_token_strings = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
    lora_targets = QWEN_VL_LORA

    def image_placeholder(self, processor: Any) -> str:
        return processor.image_token

    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        # The template already rendered <|vision_start|> and <|vision_end|> around the placeholder.
        return processor.image_token * (self.image_token_count(processor, width, height) - 2)

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        image_processor = processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, dict(self._budget(image_processor)))
        return patches // image_processor.merge_size**2 + 2  # + <|vision_start|>, <|vision_end|>

    def processor_kwargs(self, rules: ImageRules) -> Mapping[str, Any]:
        # The data layer already snapped each side to a multiple of 28 within this budget, so the
        # processor's own smart_resize leaves the image as it is.
        return {"min_pixels": rules.min_pixels, "max_pixels": rules.max_pixels}

    @staticmethod
    def _budget(image_processor: Any) -> Mapping[str, int]:
        return {"min_pixels": image_processor.size["shortest_edge"], "max_pixels": image_processor.size["longest_edge"]}

    def _image_processor(self, rules: ImageRules):
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        # A fresh `size` dict: the class's default one is shared and its __init__ edits it in place.
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": rules.min_pixels, "longest_edge": rules.max_pixels},
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=2,
        )


class Qwen2VLFamily(QwenVLFamilyBase):
    name = "qwen2_vl"
    display_name = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    language_model_type = "qwen2"
    # 28-pixel blocks (14-pixel patches merged 2x2). Default budget: at most 512 image tokens per
    # image (401,408 px, about 634x634), at least 4 (3,136 px); Qwen refuses aspect ratios over 200.
    image_rules = ImageRules(patch_multiple=28, min_edge=28, max_pixels=512 * 28 * 28, min_pixels=4 * 28 * 28,
                             max_aspect_ratio=200.0)

    def tiny_config(self) -> Any:
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config=dict(
                vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=IDS["<|im_end|>"], pad_token_id=IDS["<|endoftext|>"],
            ),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                               patch_size=self.patch_size, spatial_merge_size=self.merge_size, temporal_patch_size=2),
            image_token_id=IDS["<|image_pad|>"], video_token_id=IDS["<|video_pad|>"],
            vision_start_token_id=IDS["<|vision_start|>"], vision_end_token_id=IDS["<|vision_end|>"],
            tie_word_embeddings=False,
        )

    def offline_processor(self) -> Any:
        from transformers import Qwen2VLProcessor

        tokenizer = build_tokenizer(
            SPECIALS, chat_template=CHAT_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>", vocab_size=VOCAB_SIZE,
            extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
        return image_only(Qwen2VLProcessor)(
            image_processor=self._image_processor(self.image_rules), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
        )


FAMILY = Qwen2VLFamily()
