"""LLaVA-NeXT (LLaVA 1.6): LLaVA's CLIP tower applied to a grid of crops ("anyres").

The processor picks, among `image_grid_pinpoints`, the resolution that keeps most of the image,
cuts it into crops of the tower's size and adds the whole image as one more crop; the features of
the crops are unpadded back to the image's aspect ratio with one newline feature per row. So the
token count depends on the image's size: `image_token_count` runs the processor's own arithmetic on
it. The offline processor uses the Mistral-instruct format (`[INST] ... [/INST]`) of the most used
LLaVA-NeXT checkpoint. See `_llava`.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._llava import TINY_CROP, TINY_PATCH, LlavaFamilyBase

# Mistral-instruct with images: a system text goes before the first user message; each image is
# "<image>\n" where it stands; answers follow " [/INST]" after a space and end with </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (system + '\\n\\n' if loop.first and system else '') }}"
    "{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ ' [/INST]' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
# The tiny processor's grid: one or two crops a side.
TINY_PINPOINTS = [[TINY_CROP, 2 * TINY_CROP], [2 * TINY_CROP, TINY_CROP], [2 * TINY_CROP, 2 * TINY_CROP]]


class LlavaNextFamily(LlavaFamilyBase):
    name = "llava_next"
    display_name = "LLaVA-NeXT"
    model_types = ("llava_next",)
    language_model_type = "mistral"
    chat_template = CHAT_TEMPLATE
    # The released grids top out at 672x672 (or 1008x336): larger images are only scaled down by
    # the processor, so the budget stops there (451,584 px); never upscaled by sftop.
    image_rules = ImageRules(patch_multiple=14, min_edge=14, max_pixels=672 * 672, min_pixels=14 * 14)

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        crop = processor.image_processor.crop_size
        count = processor._get_number_of_features(height, width, crop["height"], crop["width"])
        return count - 1 if processor.vision_feature_select_strategy == "default" else count

    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        from transformers.image_processing_utils import select_best_resolution

        crop = processor.image_processor.crop_size
        best_h, best_w = select_best_resolution((height, width), processor.image_processor.image_grid_pinpoints)
        crops = (best_h // crop["height"]) * (best_w // crop["width"]) + 1  # the grid and the base crop
        return crops * ((crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size) + 1)

    def tiny_config(self) -> Any:
        from transformers import LlavaNextConfig

        parts = self.tiny_parts()
        parts["text_config"]["model_type"] = "mistral"
        return LlavaNextConfig(**parts, image_grid_pinpoints=TINY_PINPOINTS)

    def offline_processor(self) -> Any:
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": TINY_CROP},
            crop_size={"height": TINY_CROP, "width": TINY_CROP},
            image_grid_pinpoints=TINY_PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=self.tokenizer(),
            patch_size=TINY_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=self.chat_template,
        )


FAMILY = LlavaNextFamily()
