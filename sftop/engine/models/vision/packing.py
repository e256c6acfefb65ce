"""Padding-free packing of multimodal rows: the mRoPE families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
here (`RopeIndex`), the families with plain 1-D positions in `packing_text_positions.py`.

A family's `packer(model)` returns the object that packs its rows (`.pack(samples)`), small and
picklable so that the batch collator can run in a data-loader worker; `.config` is the model's.

Several samples' text and images go into one sequence so that no micro-batch row carries padding.
What keeps each sample of an mRoPE family what it was unpacked:
  * its 3-D (temporal, height, width) rotary positions are the model's own `get_rope_index`,
    computed per sample with that sample's own image grids, so they restart at 0 for every sample;
  * a fourth row of plain text positions, restarting per sample, goes in front of them
    (`position_ids` of shape [4, 1, T]): transformers' Qwen-VL language models read packed sample
    boundaries from it and build a block-causal mask (or, with a varlen attention, boundaries),
    so no token attends across samples. No attention mask and no cache (`use_cache=False`) are
    passed, which is what tells them so;
  * the first label of every sample is ignored: unpacked, no token predicts it; packed, the last
    token of the sample before would;
  * the images keep their order, so `pixel_values` and `image_grid_thw` are the samples' own,
    concatenated, and the vision tower attends within each image as before.

The summed loss of a packed row equals the per-sample summed losses
(`tests/vision/test_vlm_packing.py`).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
# batch keys of one sample that are per-token ([1, L]) and per-image (concatenated in order)
TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def packing_refusal(family: Any) -> str | None:
    """Why a VLM family's rows cannot be packed (None: they can); `family` None is an unknown VLM."""
    if family is None:
        return "a vision-language model sftop has no family for"
    return family.packing_refusal


class RopeIndex:
    """A Qwen-VL model's `get_rope_index` without the model: its config and its class's methods.

    The 3-D positions depend only on the config (merge size, token ids) and the inputs, so the
    batch collator, which may run in a data-loader worker process, holds this small picklable
    object instead of the model and its weights."""

    positions = "3-D positions"  # what restarts per sample (the run's packing message says it)

    def __init__(self, model: Any):
        rope = _rope_model(model)
        self.config = rope.config
        self.rope_class = type(rope)

    def pack(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pack_rows(self, samples)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("config", "rope_class", "positions"):
            raise AttributeError(name)
        # the class's own methods, bound to this object: get_rope_index calls its helpers on `self`
        return getattr(self.rope_class, name).__get__(self)


def _rope_model(model) -> Any:
    """The module with `get_rope_index` inside a (PEFT-wrapped) Qwen-VL model."""
    if isinstance(model, RopeIndex):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for m in (base, getattr(base, "model", None)):
        if m is not None and callable(getattr(m, "get_rope_index", None)):
            return m
    raise ValueError(f"{type(base).__name__} has no get_rope_index: packing needs an mRoPE (Qwen-VL) model")


def _token_types(model, input_ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    video = getattr(config, "video_token_id", None)
    if video is not None:
        types[input_ids == video] = 2
    return types


def check_sample(i: int, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sample `i`'s input ids, once it is one unpadded row with labels (else ValueError naming it)."""
    ids = sample["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"sample {i}: input_ids of shape {tuple(ids.shape)}; pack one sample per batch [1, L]")
    if "labels" not in sample:
        raise ValueError(f"sample {i}: no labels to pack")
    mask = sample.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(f"sample {i} is padded: collate each sample on its own before packing")
    return ids


def pack_rows(model, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One packed row (batch size 1) from samples collated one per batch, each with `input_ids`,
    `labels` ([1, L], no padding) and, where it holds images, `pixel_values` and `image_grid_thw`.
    `model`: the (PEFT-wrapped) Qwen-VL model, or its `RopeIndex`.

    Raises ValueError naming the sample when one is padded, holds several rows or lacks labels."""
    if not samples:
        raise ValueError("pack_rows needs at least one sample")
    rope = _rope_model(model)
    tokens: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KEYS}
    images: dict[str, list[torch.Tensor]] = {k: [] for k in IMAGE_KEYS}
    text_pos, rope_pos = [], []
    for i, sample in enumerate(samples):
        ids = check_sample(i, sample)
        types = sample.get("mm_token_type_ids")
        if types is None:
            types = _token_types(rope, ids)
        grid = sample.get("image_grid_thw")
        with torch.no_grad():
            pos, _ = rope.get_rope_index(
                input_ids=ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=torch.ones_like(ids)
            )
        rope_pos.append(pos)
        text_pos.append(torch.arange(ids.shape[1], device=ids.device, dtype=pos.dtype))
        labels = sample["labels"].clone()
        labels[:, 0] = IGNORE
        tokens["input_ids"].append(ids)
        tokens["labels"].append(labels)
        tokens["mm_token_type_ids"].append(types.to(torch.int32))
        for key in IMAGE_KEYS:
            if sample.get(key) is not None:
                images[key].append(sample[key])
    packed = {k: torch.cat(v, dim=1) for k, v in tokens.items()}
    positions = torch.cat(rope_pos, dim=2)
    packed["position_ids"] = torch.cat([torch.cat(text_pos)[None, None], positions], dim=0)
    for key, parts in images.items():
        if parts:
            packed[key] = torch.cat(parts, dim=0)
    # transformers reads sample boundaries from the positions only without a cache: with one, the
    # packed samples would attend to each other
    packed["use_cache"] = False
    return packed
