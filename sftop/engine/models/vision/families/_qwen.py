"""What the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share.

Images keep their aspect ratio at any size that is a multiple of the merged patch (the ViT's patch
times the 2x2 merge); each merged block becomes one `<|image_pad|>` token, the run enclosed in
`<|vision_start|>` ... `<|vision_end|>`. The processor's own arithmetic (smart_resize within
`min_pixels`..`max_pixels`) gives the count. The chat format is ChatML.
"""

from __future__ import annotations

from typing import Any, Mapping

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._offline import build_tokenizer, image_only, token_ids
from sftop.engine.models.vision.family import LoraTargets, VisionFamily

SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IDS = token_ids(SPECIALS)
VOCAB_SIZE = 400


def chat_template(default_system: str | None) -> str:
    """The Qwen-VL turn format: ChatML, each image rendered as
    <|vision_start|><|image_pad|><|vision_end|> where it stands in the message; Qwen2-VL and
    Qwen2.5-VL add a default system turn to rows that have none, Qwen3-VL does not."""
    default = (
        (
            "{%- if loop.first and message['role'] != 'system' -%}"
            f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
            "{%- endif -%}"
        )
        if default_system
        else ""
    )
    return (
        "{%- for message in messages -%}" + default + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
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


# Module names of Qwen2VL/Qwen2_5_VL/Qwen3VLForConditionalGeneration (transformers 5):
#   model.language_model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}
#   model.visual.blocks.N.attn.{qkv,proj}; its MLP: mlp.{fc1,fc2} (Qwen2-VL),
#     mlp.{gate,up,down}_proj (Qwen2.5-VL), mlp.linear_fc{1,2} (Qwen3-VL)
#   the projector: model.visual.merger.mlp.{0,2} (Qwen2/2.5-VL), model.visual.merger.linear_fc{1,2}
#     and model.visual.deepstack_merger_list.N.linear_fc{1,2} (Qwen3-VL)
QWEN_VL_LORA = LoraTargets(
    language=r"model\.language_model\.layers\.\d+\..*",
    vision=r"model\.visual\.blocks\.\d+\..*",
    projector=r"model\.visual\.(merger|deepstack_merger_list\.\d+)\..*",
    attention=r".*\.(self_attn\.(q|k|v|o)_proj|attn\.(qkv|proj))",
    mlp=r".*\.(mlp\.((gate|up|down)_proj|fc1|fc2|linear_fc1|linear_fc2|0|2)|(merger|deepstack_merger_list\.\d+)\.linear_fc\d)",
)


class QwenVLFamilyBase(VisionFamily):
    """What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share: pixel-budget images on a merged patch grid.

    Subclasses set `patch_size`, `default_system`, `processor_class()` and `tiny_config()`.
    """

    supports_multiple_images = True
    supports_system_turn = True
    patch_size = 14
    merge_size = 2
    # Qwen2-VL and Qwen2.5-VL: 28-pixel blocks (14-pixel patches merged 2x2). Default budget: at
    # most 512 image tokens per image (401,408 px, about 634x634), at least 4 (3,136 px); Qwen
    # refuses aspect ratios over 200. Qwen3-VL (32-pixel blocks) sets its own.
    image_rules = ImageRules(
        patch_multiple=28, min_edge=28, max_pixels=512 * 28 * 28, min_pixels=4 * 28 * 28, max_aspect_ratio=200.0
    )
    default_system: str | None = "You are a helpful assistant."
    image_token_strings = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
    lora_targets = QWEN_VL_LORA
    # Packed rows keep each sample's own 3-D positions (get_rope_index per sample) and the text
    # positions the language model reads sample boundaries from: tests/vision/test_vlm_packing.py
    packing_refusal = None

    def packer(self, model: Any) -> Any:
        from sftop.engine.models.vision.packing import RopeIndex

        return RopeIndex(model)

    def processor_class(self) -> Any:
        raise NotImplementedError

    def pil_processor_classes(self) -> tuple[Any, Any]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return image_only(self.processor_class()), Qwen2VLImageProcessorPil

    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        # The template already rendered <|vision_start|> and <|vision_end|> around the placeholder.
        return processor.image_token * (self.image_token_count(processor, width, height) - 2)

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        image_processor = processor.image_processor
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2 + 2  # + <|vision_start|>, <|vision_end|>

    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        # one ViT position per 14/16-pixel patch, before the 2x2 merge
        return processor.image_processor.get_number_of_image_patches(height, width, {})

    def configure_processor(self, processor: Any, rules: ImageRules) -> None:
        # The data layer snapped each side to the merged grid within this budget, so with the same
        # budget the processor's smart_resize leaves every image as it is, and counting tokens from
        # the processor's state gives what it emits.
        image_processor = processor.image_processor
        image_processor.size = type(image_processor.size)(shortest_edge=rules.min_pixels, longest_edge=rules.max_pixels)

    def processor_kwargs(self, rules: ImageRules) -> Mapping[str, Any]:
        return {"min_pixels": rules.min_pixels, "max_pixels": rules.max_pixels}

    def offline_processor(self) -> Any:
        processor_class, image_processor_class = self.pil_processor_classes()
        template = chat_template(self.default_system)
        tokenizer = build_tokenizer(
            SPECIALS,
            chat_template=template,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            vocab_size=VOCAB_SIZE,
            extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
        rules = self.image_rules
        # A fresh `size` dict: the class's default one is shared and its __init__ edits it in place.
        image_processor = image_processor_class(
            size={"shortest_edge": rules.min_pixels, "longest_edge": rules.max_pixels},
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=2,
        )
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    def text_config(self, **overrides: Any) -> dict:
        """The tiny language model's config, with the offline tokenizer's ids."""
        return (
            dict(
                vocab_size=VOCAB_SIZE,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None,
                eos_token_id=IDS["<|im_end|>"],
                pad_token_id=IDS["<|endoftext|>"],
            )
            | overrides
        )

    @staticmethod
    def token_id_config() -> dict:
        return dict(
            image_token_id=IDS["<|image_pad|>"],
            video_token_id=IDS["<|video_pad|>"],
            vision_start_token_id=IDS["<|vision_start|>"],
            vision_end_token_id=IDS["<|vision_end|>"],
        )
