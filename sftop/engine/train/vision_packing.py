"""Packed micro-batches of a vision-language run: several rows in one padding-free row.

The trainer asks for micro_batch rows at a time, as for padded batches, so train.effective_batch
stays "rows per optimizer step" exactly. Each row is collated on its own by the family collator
(the same processor call and label masking as a padded batch, without padding), then the rows
are concatenated by the family's packer (`VisionFamily.packer`): positions restarting per sample
(for the mRoPE families each sample's own 3-D positions from its image grids:
sftop.engine.models.vision.packing; plain ones: packing_text_positions), which the language model
reads sample boundaries from, each sample's first label ignored, images kept in order. The
collator holds the packer, not the model, so it runs in the data-loader worker that prepares the
next micro-batches while the GPU trains (train/config.py: dataloader_settings).

Before training, `vision_packing_isolated` runs two samples separately and packed through the
real model (its attention implementation and kernels): a packed row that lets one sample see the
other turns packing off, as the text path does (train/packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

# How many rows a packed batch holds (popped by the trainer: it counts samples, the model never sees it)
PACKED_ROWS = "sftop_packed_rows"


@dataclass
class PackedVisionBatches:
    """TRL's `data_collator` for a packed VLM run: row indices in, one packed row out."""

    batches: Any  # sftop.engine.train.vision_data.VisionBatches: one row's tensors at a time
    packer: Any  # the family's packer (VisionFamily.packer): .pack(samples) -> one packed row

    def __call__(self, items: Sequence[dict]) -> dict:
        samples = [self.batches([item]) for item in items]
        packed = self.packer.pack(samples)
        # the trainer passes use_cache=False to every forward itself (a second one would clash)
        packed.pop("use_cache", None)
        packed[PACKED_ROWS] = len(samples)
        return packed


def take_packed_rows(inputs: dict) -> int | None:
    """Pop the row count of a packed VLM batch (None for any other batch)."""
    rows = inputs.pop(PACKED_ROWS, None)
    return None if rows is None else int(rows)


def _text_ids(config: Any, n: int, generator: torch.Generator) -> torch.Tensor:
    """n ordinary token ids: none of the image or video placeholders (which would ask for a grid)."""
    text = getattr(config, "text_config", config)
    vocab = int(getattr(text, "vocab_size", None) or config.vocab_size)
    ids = torch.randint(4, max(5, vocab - 1), (n,), generator=generator)
    for special in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)):
        if special is not None:
            ids[ids == special] = 4 if special != 4 else 5
    return ids[None]


@torch.no_grad()
def vision_packing_isolated(model, packer: Any, *, lengths=(11, 7)) -> tuple[bool, str]:
    """Whether a packed row keeps its samples apart in this model, as loaded and patched."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        docs = [_text_ids(packer.config, n, gen) for n in lengths]

        def logits(samples: list[torch.Tensor]) -> torch.Tensor:
            batch = packer.pack([{"input_ids": d, "labels": d} for d in samples])
            batch.pop("labels")
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            return model(**batch).logits[0].float()

        separate = [logits([d]) for d in docs]
        packed = logits(docs)
        joined = logits([torch.cat(docs, dim=1)])  # what attending across samples would give
        second = slice(lengths[0], lengths[0] + lengths[1])
        err = (packed[second] - separate[1]).abs().max().item()
        err0 = (packed[: lengths[0]] - separate[0]).abs().max().item()
        leak = (joined[second] - separate[1]).abs().max().item()
    finally:
        model.train(was_training)
    ok = err <= 0.1 * leak + 1e-4 and err0 <= 0.1 * leak + 1e-4
    return ok, f"packed-vs-separate max |dlogit| {max(err, err0):.2e}, cross-sample effect {leak:.2e}"
