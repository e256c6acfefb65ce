"""What LLaVA 1.5 and LLaVA-NeXT share: a CLIP tower whose patch features, projected by a 2-layer
MLP, stand in for a run of `<image>` tokens in a Llama-family language model.

The tower's input is a fixed square crop (336x336 for the released models), so the processor
resizes and crops every image; the data layer's pixel budget only bounds what is decoded. The
text model is whatever `text_config` names (Vicuna/Llama for LLaVA 1.5, Mistral, Vicuna or
Llama 3 for LLaVA-NeXT): `language_model_type_for(config)` reads it.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.models.vision.families._offline import build_tokenizer, token_ids
from sftop.engine.models.vision.family import LoraTargets, VisionFamily

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IDS = token_ids(SPECIALS)
VOCAB_SIZE = 400

# Module names of LlavaForConditionalGeneration / LlavaNextForConditionalGeneration (transformers 5):
#   model.language_model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}
#   model.vision_tower.vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.{fc1,fc2}}  (CLIP)
#   model.multi_modal_projector.{linear_1,linear_2}
LLAVA_LORA = LoraTargets(
    language=r"model\.language_model\.layers\.\d+\..*",
    vision=r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\..*",
    projector=r"model\.multi_modal_projector\..*",
    attention=r".*\.self_attn\.(q|k|v|o|out)_proj",
    mlp=r".*\.(mlp\.((gate|up|down)_proj|fc1|fc2)|multi_modal_projector\.linear_\d)",
)

# The tiny models: a 32x32 crop in 8-pixel patches, 16 patch features (+ CLS, dropped).
TINY_CROP = 32
TINY_PATCH = 8


class LlavaFamilyBase(VisionFamily):
    supports_multiple_images = True
    supports_system_turn = True
    image_token_strings = ("<image>",)
    lora_targets = LLAVA_LORA
    packing_refusal: str | None = (
        "its tiled images come with per-image sizes and patch counts that packing by positions "
        "does not keep apart yet, so it keeps padded batches"
    )
    chat_template: str

    def language_model_type_for(self, config: Any) -> str | None:
        from sftop.kernels.patching.registry import FAMILIES

        model_type = getattr(config.get_text_config(), "model_type", None)
        return model_type if model_type in FAMILIES else None

    def image_expansion(self, processor: Any, width: int, height: int) -> str:
        return processor.image_token * self.image_token_count(processor, width, height)

    def tokenizer(self):
        return build_tokenizer(
            SPECIALS,
            chat_template=self.chat_template,
            eos="</s>",
            pad="<pad>",
            bos="<s>",
            unk="<unk>",
            vocab_size=VOCAB_SIZE,
            extra={"image_token": "<image>"},
        )

    @staticmethod
    def tiny_parts() -> dict:
        return dict(
            text_config=dict(
                model_type="llama",
                vocab_size=VOCAB_SIZE,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                bos_token_id=IDS["<s>"],
                eos_token_id=IDS["</s>"],
                pad_token_id=IDS["<pad>"],
            ),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=TINY_CROP,
                patch_size=TINY_PATCH,
                projection_dim=32,
            ),
            image_token_index=IDS["<image>"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
