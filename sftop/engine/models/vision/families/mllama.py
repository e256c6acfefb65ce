"""Llama 3.2 Vision (`mllama`): a tiled ViT whose features reach the language model through
cross-attention layers interleaved with its self-attention layers, not through the token sequence.

Each image is one `<|image|>` token in the text; the processor turns the tokens that follow it
into a `cross_attention_mask` over that image's tiles (up to 4 tiles of 560x560, chosen by aspect
ratio: `aspect_ratio_ids`, `aspect_ratio_mask`). So an image costs one token of sequence, and its
compute and memory are in the vision tower and the cross-attention layers.

The language model is not a plain Llama: its layers are Mllama's own self- and cross-attention
decoder layers (MllamaTextSelfAttention, MllamaTextCrossAttention, MllamaTextMLP), which the
kernel patch registry does not know, so `language_model_type` is None and it runs stock.
Meta trained it with one image per prompt; the processor and model accept several (each image
then attends from its token to the next image's), and sftop allows them.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._offline import build_tokenizer, token_ids
from sftop.engine.models.vision.family import LoraTargets, VisionFamily

SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|image|>",
    "<|python_tag|>",
)
IDS = token_ids(SPECIALS)
VOCAB_SIZE = 400

# The Llama 3 header format; each image written as <|image|> where it stands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# The tiny model: 32-pixel tiles in 8-pixel patches, at most 4 tiles per image.
TINY_TILE = 32
TINY_PATCH = 8
TINY_TILES = 4  # the config accepts only 4 with its default aspect ratios


class MllamaFamily(VisionFamily):
    name = "mllama"
    display_name = "Llama 3.2 Vision"
    model_types = ("mllama",)
    language_model_type = None  # cross-attention decoder layers: see the module docstring
    packing_refusal = (
        "its text attends to each row's images through cross-attention masks per row, "
        "which one packed row would merge across samples"
    )
    image_token_strings = ("<|image|>",)
    supports_multiple_images = True
    mixes_text_only_rows = False  # its processor wants images in every row of a batch, or in none
    # 560-pixel tiles, at most 4 per image (the processor picks the tile canvas by aspect ratio and
    # resizes into it): the budget stops at 4 tiles' worth, 1120x1120 (1,254,400 px).
    image_rules = ImageRules(patch_multiple=14, min_edge=14, max_pixels=1120 * 1120, min_pixels=14 * 14)
    # Module names of MllamaForConditionalGeneration (transformers 5):
    #   model.language_model.layers.N.{self_attn|cross_attn}.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj
    #   model.vision_model.{transformer,global_transformer}.layers.N.{self_attn.{q,k,v,o}_proj, mlp.fc1, mlp.fc2}
    #   model.multi_modal_projector
    lora_targets = LoraTargets(
        language=r"model\.language_model\.layers\.\d+\..*",
        vision=r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\..*",
        projector=r"model\.multi_modal_projector",
        attention=r".*\.(self_attn|cross_attn)\.(q|k|v|o)_proj",
        mlp=r".*\.mlp\.((gate|up|down)_proj|fc1|fc2)",
    )

    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        return processor.image_token  # not expanded: the image enters through cross-attention

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        return 1

    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        # The tower runs every image on all `max_image_tiles` tiles (unused ones are zeros), each
        # tile's patches plus a class position, padded to a multiple of 8.
        tile = processor.image_processor.size["height"]
        per_tile = (tile // config.vision_config.patch_size) ** 2 + 1
        return processor.image_processor.max_image_tiles * (per_tile + (-per_tile) % 8)

    def open_image_path(self, model: Any) -> None:
        # the cross-attention layers' tanh gates start at zero: no image reaches the text
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(1.0)

    def tiny_config(self) -> Any:
        from transformers import MllamaConfig

        return MllamaConfig(
            text_config=dict(
                vocab_size=VOCAB_SIZE,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                cross_attention_layers=[1],
                max_position_embeddings=2048,
                bos_token_id=IDS["<|begin_of_text|>"],
                eos_token_id=IDS["<|eot_id|>"],
                pad_token_id=IDS["<|finetune_right_pad_id|>"],
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_global_layers=1,
                attention_heads=2,
                intermediate_layers_indices=[0],
                vision_output_dim=64,
                image_size=TINY_TILE,
                patch_size=TINY_PATCH,
                max_num_tiles=TINY_TILES,
            ),
            image_token_index=IDS["<|image|>"],
        )

    def offline_processor(self) -> Any:
        from transformers import MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        tokenizer = build_tokenizer(
            SPECIALS,
            chat_template=CHAT_TEMPLATE,
            eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
            bos="<|begin_of_text|>",
            vocab_size=VOCAB_SIZE,
            extra={"image_token": "<|image|>"},
        )
        image_processor = MllamaImageProcessorPil(
            size={"height": TINY_TILE, "width": TINY_TILE},
            max_image_tiles=TINY_TILES,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


FAMILY = MllamaFamily()
