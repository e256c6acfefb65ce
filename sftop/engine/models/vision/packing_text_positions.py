"""Padding-free packing of multimodal rows for families whose language model takes plain 1-D
positions (LLaVA 1.5: a Llama language model after a CLIP tower).

What keeps each sample what it was unpacked:
  * its positions restart at 0 (`position_ids` [1, T]): transformers' language models read packed
    sample boundaries from them when no attention mask and no cache are passed, and attend within
    each sample only (block-causal mask, or boundaries for a varlen attention);
  * the first label of every sample is ignored: unpacked, no token predicts it; packed, the last
    token of the sample before would;
  * the images keep their order: `pixel_values` ([images, 3, H, W], every image the processor's one
    crop size) are the samples' own, concatenated, and the model puts each image's features into
    the image tokens in order, so every sample gets its own images back.

The summed loss and LoRA gradients of a packed row equal the per-sample ones
(`tests/vision/test_vlm_packing.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from sftop.engine.models.vision.packing import IGNORE, check_sample


class TextPositions:
    """Packs rows of a family with 1-D positions; holds only the model's config (picklable)."""

    positions = "positions"  # what restarts per sample (the run's packing message says it)

    def __init__(self, model: Any):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config

    def pack(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One packed row (batch size 1) from samples collated one per batch, each with `input_ids`
        and `labels` ([1, L], no padding) and, where it holds images, `pixel_values`.

        Raises ValueError naming the sample when one is padded, holds several rows, lacks labels
        or carries per-image keys this packing does not keep apart (image sizes of tiled images)."""
        if not samples:
            raise ValueError("pack needs at least one sample")
        ids_parts, label_parts, position_parts, pixel_parts = [], [], [], []
        for i, sample in enumerate(samples):
            ids = check_sample(i, sample)
            extra = sorted(k for k in sample if k not in ("input_ids", "labels", "attention_mask", "pixel_values"))
            if extra:
                raise ValueError(
                    f"sample {i} carries {', '.join(extra)}, which packing by positions does not keep apart"
                )
            labels = sample["labels"].clone()
            labels[:, 0] = IGNORE
            ids_parts.append(ids)
            label_parts.append(labels)
            position_parts.append(torch.arange(ids.shape[1], device=ids.device))
            if sample.get("pixel_values") is not None:
                pixel_parts.append(sample["pixel_values"])
        packed = {
            "input_ids": torch.cat(ids_parts, dim=1),
            "labels": torch.cat(label_parts, dim=1),
            "position_ids": torch.cat(position_parts)[None],
        }
        if pixel_parts:
            packed["pixel_values"] = torch.cat(pixel_parts, dim=0)
        # transformers reads sample boundaries from the positions only without a cache: with one, the
        # packed samples would attend to each other
        packed["use_cache"] = False
        return packed
