"""LLaVA 1.5: CLIP ViT-L/14 at 336x336 (576 patch features after dropping CLS) and a Vicuna
(Llama) language model, in the `USER: ... ASSISTANT:` format. See `_llava`."""

from __future__ import annotations

from typing import Any

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._llava import TINY_CROP, TINY_PATCH, LlavaFamilyBase

# LLaVA 1.5's turn format: an optional system text, "USER: " with each image as "<image>\n" where it
# stands, "ASSISTANT: " answers closed by </s> (what the model learns to stop with).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


class LlavaFamily(LlavaFamilyBase):
    name = "llava"
    display_name = "LLaVA 1.5"
    model_types = ("llava",)
    language_model_type = "llama"
    chat_template = CHAT_TEMPLATE
    # The processor resizes the shorter side to 336 and centre-crops 336x336 whatever the input, so
    # the budget only bounds decoding: at most 672x672 (451,584 px), never upscaled by sftop.
    image_rules = ImageRules(patch_multiple=14, min_edge=14, max_pixels=672 * 672, min_pixels=14 * 14)
    # Every image is the processor's one crop, so packed rows concatenate pixel_values, and the Llama
    # language model reads sample boundaries from restarting positions: tests/vision/test_vlm_packing.py
    packing_refusal = None

    def packer(self, model: Any) -> Any:
        from sftop.engine.models.vision.packing_text_positions import TextPositions

        return TextPositions(model)

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        # the processor's arithmetic: patches of the crop, plus CLS, minus CLS again where the
        # "default" strategy drops it
        crop = processor.image_processor.crop_size
        count = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
        count += processor.num_additional_image_tokens
        return count - 1 if processor.vision_feature_select_strategy == "default" else count

    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        crop = processor.image_processor.crop_size
        return (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size) + 1  # + CLS

    def tiny_config(self) -> Any:
        from transformers import LlavaConfig

        return LlavaConfig(**self.tiny_parts(), image_seq_length=(TINY_CROP // TINY_PATCH) ** 2)

    def offline_processor(self) -> Any:
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": TINY_CROP},
            crop_size={"height": TINY_CROP, "width": TINY_CROP},
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=self.tokenizer(),
            patch_size=TINY_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=self.chat_template,
        )


FAMILY = LlavaFamily()
