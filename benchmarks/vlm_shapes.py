"""Vision-language shapes for the step benchmark: random-init models of real shapes and batches
with one image per row, built the way each family's processor lays them out.

Qwen2.5-VL-3B takes each 448x448 image as a 32x32 grid of 14-pixel patches (1,024 patch rows of
3 x 2 x 14 x 14 values, a temporal pair per patch), merged 2x2 into 256 image tokens between
`<|vision_start|>` and `<|vision_end|>`; its language model needs the image tokens marked in
`mm_token_type_ids` to compute the 3-D (mRoPE) position ids. Gemma-3-4B always takes 896x896
images (SigLIP, 14-pixel patches, 4,096 patches pooled to 256 soft tokens between
`<start_of_image>` and `<end_of_image>`), and marks image tokens in `token_type_ids` so that they
attend to each other bidirectionally.

Every row holds `seq` tokens in all: the image's tokens, then random text trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class VisionShape:
    model_type: str
    text: dict
    vision: dict
    extra: dict
    image_side: int  # pixels a side the family's processor hands the tower
    image_tokens: int  # tokens one image becomes, begin/end markers excluded
    # LoRA targets: the language model's seven projections and the tower's linear layers
    lora_targets: str


# the language model's seven projections: the LoRA of `--frozen-tower` runs (the default parts)
LANGUAGE_LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_QWEN_LORA = (
    LANGUAGE_LORA + r"|.*visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)"
)
_GEMMA_LORA = LANGUAGE_LORA + r"|.*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"

SHAPES: dict[str, VisionShape] = {
    "qwen2.5-vl-3b": VisionShape(
        model_type="qwen2_5_vl",
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            hidden_act="silu",
        ),
        extra=dict(tie_word_embeddings=True),
        image_side=448,
        image_tokens=256,
        lora_targets=_QWEN_LORA,
    ),
    "gemma-3-4b": VisionShape(
        model_type="gemma3",
        text=dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            max_position_embeddings=131072,
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
        ),
        extra=dict(mm_tokens_per_image=256),
        image_side=896,
        image_tokens=256,
        lora_targets=_GEMMA_LORA,
    ),
}
# for a CPU smoke run of the benchmark itself, not for numbers
SHAPES["qwen2.5-vl-tiny"] = VisionShape(
    model_type="qwen2_5_vl",
    text=dict(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    ),
    vision=dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        hidden_act="silu",
    ),
    extra=dict(tie_word_embeddings=True),
    image_side=56,
    image_tokens=4,
    lora_targets=_QWEN_LORA,
)
SHAPES["gemma-3-tiny"] = VisionShape(
    model_type="gemma3",
    text=dict(
        vocab_size=262208,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=64,
        max_position_embeddings=4096,
    ),
    vision=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
    ),
    extra=dict(mm_tokens_per_image=4),
    image_side=56,
    image_tokens=4,
    lora_targets=_GEMMA_LORA,
)


def is_vision_shape(name: str) -> bool:
    return name in SHAPES


def config(name: str):
    from transformers import AutoConfig

    shape = SHAPES[name]
    cfg = AutoConfig.for_model(
        shape.model_type, text_config=dict(shape.text), vision_config=dict(shape.vision), **shape.extra
    )
    cfg.use_cache = False
    cfg.text_config.use_cache = False
    return cfg


def model_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def batch_maker(name: str, model_config, batch: int, seq: int, device: str, generator) -> Callable[[], dict[str, Any]]:
    """A function returning a fresh random batch of `batch` rows of `seq` tokens, one image each."""

    shape = SHAPES[name]
    if shape.model_type == "qwen2_5_vl":
        return _qwen_batches(shape, model_config, batch, seq, device, generator)
    return _gemma_batches(shape, model_config, batch, seq, device, generator)


def _text_ids(model_config, batch: int, n: int, device: str, generator, special: set[int]):
    import torch

    # stay clear of the special ids at the top of the vocabulary (image and turn markers)
    high = min(model_config.text_config.vocab_size, min(special)) - 1
    return torch.randint(1, high, (batch, n), device=device, generator=generator)


def _qwen_batches(shape, cfg, batch, seq, device, generator):
    import torch

    vis = cfg.vision_config
    grid = shape.image_side // vis.patch_size  # patches a side
    merged = grid // vis.spatial_merge_size
    assert merged * merged == shape.image_tokens, "image_side and image_tokens disagree"
    patch_values = vis.in_channels * vis.temporal_patch_size * vis.patch_size**2
    n_text = seq - shape.image_tokens - 2
    start, pad, end = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    thw = torch.tensor([[1, grid, grid]] * batch, device=device)

    def make():
        ids = torch.cat(
            [
                torch.full((batch, 1), start, device=device),
                torch.full((batch, shape.image_tokens), pad, device=device),
                torch.full((batch, 1), end, device=device),
                _text_ids(cfg, batch, n_text, device, generator, {start, pad, end}),
            ],
            dim=1,
        )
        labels = ids.clone()
        labels[:, : shape.image_tokens + 2] = -100
        mm = (ids == pad).int()
        pixels = torch.randn(batch * grid * grid, patch_values, device=device, generator=generator)
        return dict(
            input_ids=ids,
            labels=labels,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_grid_thw=thw,
            mm_token_type_ids=mm,
        )

    return make


def _gemma_batches(shape, cfg, batch, seq, device, generator):
    import torch

    boi, img, eoi = cfg.boi_token_index, cfg.image_token_index, cfg.eoi_token_index
    n_text = seq - shape.image_tokens - 2

    def make():
        ids = torch.cat(
            [
                torch.full((batch, 1), boi, device=device),
                torch.full((batch, shape.image_tokens), img, device=device),
                torch.full((batch, 1), eoi, device=device),
                _text_ids(cfg, batch, n_text, device, generator, {boi, img, eoi}),
            ],
            dim=1,
        )
        labels = ids.clone()
        labels[:, : shape.image_tokens + 2] = -100
        side = shape.image_side
        pixels = torch.randn(batch, 3, side, side, device=device, generator=generator)
        return dict(
            input_ids=ids,
            labels=labels,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            token_type_ids=(ids == img).long(),
        )

    return make


def vision_part(model):
    """The tower and projector of a (PEFT-wrapped) VLM, to time them on their own."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    import torch

    def joined(out):  # Qwen returns one tensor per image
        return torch.cat(out, dim=0) if isinstance(out, (tuple, list)) else out

    if hasattr(inner, "visual"):  # Qwen: the merger (projector) is part of `visual`
        return lambda b: joined(inner.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output)
    return lambda b: joined(inner.get_image_features(b["pixel_values"]).pooler_output)


def text_only(batch: dict) -> dict:
    """The same rows with the image tokens replaced by text tokens: the language model's share."""
    ids = batch["input_ids"].clone()
    special = ids[:, 0:1]
    ids = ids.where(ids != special, ids[:, -1:])  # begin markers
    image_rows = batch["labels"] == -100
    ids = ids.where(~image_rows, ids[:, -1:])
    return dict(input_ids=ids, labels=ids.clone(), attention_mask=batch["attention_mask"])
