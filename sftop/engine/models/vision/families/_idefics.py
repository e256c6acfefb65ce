"""What Idefics3 and SmolVLM share: images cut into square tiles plus a downscaled global view.

The processor scales each image so its longest side is `size["longest_edge"]` (a whole number of
tiles), cuts it into `rows x cols` tiles of `max_image_size["longest_edge"]` pixels and adds the
whole image at one tile's size. Each tile and the global view become `image_seq_len` `<image>`
tokens (the ViT's patches pixel-shuffled by the connector), each tile prefixed by
`<fake_token_around_image><row_R_col_C>`, the global view by `<fake_token_around_image><global-img>`
and closed by one more `<fake_token_around_image>`; a newline ends each row of tiles.

So the token count depends on the aspect ratio and on how many tiles the longest side may span.
sftop's pixel budget sets that: `configure_processor` allows `floor(sqrt(max_pixels) / tile)` tiles
along the longest side (at least one), where `tile` is `image_rules.patch_multiple`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from sftop.engine.data.images import ImageRules
from sftop.engine.models.vision.families._offline import build_tokenizer, token_ids
from sftop.engine.models.vision.family import LoraTargets, VisionFamily

ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
) + ROW_COL_TOKENS
IDS = token_ids(SPECIALS)
VOCAB_SIZE = 400

# The Idefics3 / SmolVLM turn format: "User:" / "Assistant:" / "System:" with a space before text
# (none before an image), each turn closed by <end_of_utterance>, images written as <image>.
CHAT_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
    "{%- else -%}"
    "{%- if message['content'][0]['type'] == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# Module names of Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (transformers 5):
#   model.text_model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}  (a Llama)
#   model.vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.{fc1,fc2}}  (SigLIP)
#   model.connector.modality_projection.proj  (the projector)
IDEFICS_LORA = LoraTargets(
    language=r"model\.text_model\.layers\.\d+\..*",
    vision=r"model\.vision_model\.encoder\.layers\.\d+\..*",
    projector=r"model\.connector\..*",
    attention=r".*\.self_attn\.(q|k|v|o|out)_proj",
    mlp=r".*\.mlp\.((gate|up|down)_proj|fc1|fc2)",
)

# The tiny models: 32-pixel tiles in 8-pixel patches (4x4), pixel-shuffled 2x2 into 4 tokens per
# tile; at most 2 tiles along the longest side.
TINY_TILE = 32
TINY_PATCH = 8
TINY_SCALE = 2
TINY_SEQ = (TINY_TILE // TINY_PATCH) ** 2 // TINY_SCALE**2


class IdeficsFamilyBase(VisionFamily):
    """Tiled images (Idefics3, SmolVLM). Subclasses set `processor_class()`, `image_processor_class()`
    and `config_class()`."""

    supports_multiple_images = True
    supports_system_turn = True
    language_model_type = "llama"  # the text model is a Llama
    packing_refusal = (
        "its pixel values come per row as padded image tiles with a pixel attention mask, "
        "not as one list of images a packed row could share"
    )
    image_token_strings = ("<fake_token_around_image>", "<image>", "<global-img>") + ROW_COL_TOKENS
    lora_targets = IDEFICS_LORA
    default_lora_parts = ("language", "attention", "mlp")

    def processor_class(self) -> Any:
        raise NotImplementedError

    def image_processor_class(self) -> Any:
        raise NotImplementedError

    def config_class(self) -> Any:
        raise NotImplementedError

    def pil_processor_classes(self) -> tuple[Any, Any]:
        return self.processor_class(), self.image_processor_class()

    def _rows_cols(self, processor: Any, width: int, height: int) -> tuple[int, int]:
        _, rows, cols = processor.image_processor.get_number_of_image_patches(height, width, {})
        return rows, cols

    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        rows, cols = self._rows_cols(processor, width, height)
        # The processor's own replacement, fed the tile grid its image processor would report.
        return processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, image_idx=0)

    def image_token_count(self, processor: Any, width: int, height: int) -> int:
        rows, cols = self._rows_cols(processor, width, height)
        seq = processor.image_seq_len
        # each tile: <fake_token_around_image><row_R_col_C> + seq <image>; the global view:
        # <fake_token_around_image><global-img> + seq <image> + <fake_token_around_image>
        return rows * cols * (seq + 2) + seq + 3

    def vision_patches(self, processor: Any, config: Any, width: int, height: int) -> int:
        rows, cols = self._rows_cols(processor, width, height)
        per_tile = (processor.image_processor.max_image_size["longest_edge"] // config.vision_config.patch_size) ** 2
        return (rows * cols + 1) * per_tile  # the tiles and the global view

    def configure_processor(self, processor: Any, rules: ImageRules) -> None:
        image_processor = processor.image_processor
        tile = image_processor.max_image_size["longest_edge"]
        tiles = max(1, math.isqrt(rules.max_pixels) // rules.patch_multiple)
        image_processor.size = type(image_processor.size)(longest_edge=tiles * tile)

    def processor_kwargs(self, rules: ImageRules) -> Mapping[str, Any]:
        return {}

    def offline_processor(self) -> Any:
        tokenizer = build_tokenizer(
            SPECIALS,
            chat_template=CHAT_TEMPLATE,
            eos="<end_of_utterance>",
            pad="<|endoftext|>",
            bos="<|im_start|>",
            vocab_size=VOCAB_SIZE,
            extra={
                "fake_image_token": "<fake_token_around_image>",
                "image_token": "<image>",
                "global_image_token": "<global-img>",
                "end_of_utterance_token": "<end_of_utterance>",
            },
        )
        image_processor = self.image_processor_class()(
            size={"longest_edge": 2 * TINY_TILE},
            max_image_size={"longest_edge": TINY_TILE},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        return self.processor_class()(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_seq_len=TINY_SEQ
        )

    def tiny_config(self) -> Any:
        return self.config_class()(
            text_config=dict(
                model_type="llama",
                vocab_size=VOCAB_SIZE,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                bos_token_id=IDS["<|im_start|>"],
                eos_token_id=IDS["<end_of_utterance>"],
                pad_token_id=IDS["<|endoftext|>"],
                tie_word_embeddings=False,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=TINY_TILE,
                patch_size=TINY_PATCH,
            ),
            scale_factor=TINY_SCALE,
            image_token_id=IDS["<image>"],
            pad_token_id=IDS["<|endoftext|>"],
            tie_word_embeddings=False,
        )
