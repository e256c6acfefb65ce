"""Gemma 3: a SigLIP tower at a fixed square resolution, pooled into 256 soft tokens per image.

Every image is resized by the processor to the tower's square input (896x896 for the released
models) whatever its size, so an image always costs the same number of tokens:
`<start_of_image>`, 256 `<image_soft_token>`, `<end_of_image>`, with a blank line on each side.
Pan-and-scan (extra crops for large images) is off, as in TRL's guide, so the count stays fixed.
The text layers are Gemma 3's (`gemma3_text` in the kernel registry). A system turn is folded into
the first user turn by the template.
"""

from __future__ import annotations

from typing import Any, Mapping

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._offline import build_tokenizer, token_ids
from sftop.engine.models.vision.family import LoraTargets, VisionFamily

SPECIALS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
IDS = token_ids(SPECIALS)
VOCAB_SIZE = 400

# Gemma 3's turn format: "model" for the assistant, the system text prefixed to the first user
# turn, text parts trimmed, each image written as <start_of_image> where it stands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set prefix = messages[0]['content'] -%}"
    "{%- else -%}{%- set prefix = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set prefix = prefix + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Tiny model: a 32x32 input in 8-pixel patches (4x4), average-pooled to 2x2 = 4 soft tokens.
TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
TINY_TOKENS = 4


class Gemma3Family(VisionFamily):
    name = "gemma3"
    display_name = "Gemma 3"
    model_types = ("gemma3",)
    language_model_type = "gemma3_text"
    packing_refusal = (
        "its image tokens attend to each other both ways through a mask built from token_type_ids, "
        "which a packed row's restarting positions do not carry"
    )
    image_token_strings = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    # The processor resizes every image to the tower's square input, so the budget only bounds
    # what is decoded and kept in memory: at most the 896x896 input, no upscaling by sftop.
    image_rules = ImageRules(patch_multiple=14, min_edge=14, max_pixels=896 * 896, min_pixels=14 * 14)
    # Module names of Gemma3ForConditionalGeneration (transformers 5):
    #   model.language_model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}
    #   model.vision_tower.encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2}
    # The projector (model.multi_modal_projector) is one weight matrix and a norm, no Linear
    # layer, so LoRA cannot adapt it: its pattern matches nothing.
    lora_targets = LoraTargets(
        language=r"model\.language_model\.layers\.\d+\..*",
        vision=r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\..*",
        projector=r"",
        attention=r".*\.self_attn\.(q|k|v|o|out)_proj",
        mlp=r".*\.mlp\.((gate|up|down)_proj|fc1|fc2)",
    )

    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        return processor.full_image_sequence

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        return processor.image_seq_length + 2  # + <start_of_image>, <end_of_image>

    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        # every image at the tower's square input (SigLIP adds no class position)
        side = processor.image_processor.size["height"] // config.vision_config.patch_size
        return side * side

    def open_image_path(self, model: Any) -> None:
        # transformers initialises the projection matrix to zeros (for training from scratch)
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, weight.shape[0] ** -0.5)

    def processor_kwargs(self, rules: ImageRules) -> Mapping[str, Any]:
        # Pan-and-scan would add a variable number of crops, each another 256 tokens.
        return {"do_pan_and_scan": False}

    def tiny_config(self) -> Any:
        from transformers import Gemma3Config

        return Gemma3Config(
            text_config=dict(
                vocab_size=VOCAB_SIZE,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                query_pre_attn_scalar=16,
                max_position_embeddings=2048,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
                pad_token_id=IDS["<pad>"],
                eos_token_id=IDS["<end_of_turn>"],
                bos_token_id=IDS["<bos>"],
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=TINY_IMAGE_SIZE,
                patch_size=TINY_PATCH,
                vision_use_head=False,
            ),
            mm_tokens_per_image=TINY_TOKENS,
            boi_token_index=IDS["<start_of_image>"],
            eoi_token_index=IDS["<end_of_image>"],
            image_token_index=IDS["<image_soft_token>"],
        )

    def offline_processor(self) -> Any:
        from transformers import Gemma3Processor
        from transformers.models.gemma3 import Gemma3ImageProcessorPil

        tokenizer = build_tokenizer(
            SPECIALS,
            chat_template=CHAT_TEMPLATE,
            eos="<eos>",
            pad="<pad>",
            bos="<bos>",
            unk="<unk>",
            vocab_size=VOCAB_SIZE,
            extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        )
        image_processor = Gemma3ImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
            do_pan_and_scan=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        return Gemma3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=TINY_TOKENS,
        )


FAMILY = Gemma3Family()
