"""Token-length buckets for packed (padding-free) micro-batches.

Why: a packed micro-batch is one row whose length changes with every batch of mixed-length rows,
so a CUDA graph captured for one length never replays for the next, and the step stays
host-bound (docs/benchmarks.md: a whole run reached 39-62% of the fixed-shape step's rate). Padding
each packed row up to the next of a few fixed lengths lets the trainer capture one graph per
bucket and replay it for every batch that falls into it.

How: `BucketedCollator` wraps the padding-free collator and appends one padding document to the
packed row: pad token ids, labels -100 (so the loss and its token count skip them), positions
restarting at 0, and its own entry in `cu_seq_lens` (so no real row attends to it, and it attends
to no real row; causal attention would keep the real rows' outputs unchanged anyway, since the
padding comes last). The batch says how much it added (`PADDING_TOKENS`, `PADDING_ROWS`), which the
trainer takes out before the model sees the batch, so throughput counts only the rows' own tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# Keys the collator adds and the trainer pops before the forward.
PADDING_TOKENS = "sftop_padding_tokens"
PADDING_ROWS = "sftop_padding_rows"
# Bucket lengths are multiples of this: tensor-core friendly, and few enough distinct shapes.
BUCKET_MULTIPLE = 128
# Successive buckets grow by this factor: a batch is padded by at most 19% (about 9% on average),
# and a plan's range of packed lengths (an eighth of its largest to the largest) takes 13 buckets.
BUCKET_RATIO = 2 ** 0.25
SMALLEST_SHARE = 1 / 8


def bucket_sizes(max_tokens: int, ratio: float = BUCKET_RATIO, smallest_share: float = SMALLEST_SHARE,
                 multiple: int = BUCKET_MULTIPLE) -> tuple[int, ...]:
    """Lengths from about smallest_share x max_tokens up to max_tokens, each `ratio` times the one
    below and a multiple of `multiple`.

    The largest holds the plan's largest packed micro-batch, so every batch has a bucket; batches
    shorter than the smallest are padded up to it (they are rare: a micro-batch packs several rows).
    """
    if max_tokens < 1 or ratio <= 1 or not 0 < smallest_share <= 1:
        raise ValueError(f"need max_tokens >= 1, ratio > 1 and 0 < smallest_share <= 1; got {max_tokens}, "
                         f"{ratio}, {smallest_share}")
    top = -(-max_tokens // multiple) * multiple
    sizes = {top}
    size = float(top)
    while size / ratio >= top * smallest_share:
        size /= ratio
        sizes.add(max(multiple, -(-int(size) // multiple) * multiple))
    return tuple(sorted(sizes))


def buckets_wanted(setting: str, graphs_on: bool) -> bool:
    """train.length_buckets: "on", "off", or "auto".

    "auto" is off for now: on an H100 (docs/benchmarks.md) a 75-step whole run with buckets and
    their graphs was 0.96x the same run without them, so they are only used when asked for.
    `graphs_on` stays in the signature so that auto can follow the graphs again once buckets win.
    """
    del graphs_on
    return setting == "on"


def bucket_for(tokens: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket that holds `tokens`; past the largest, `tokens` itself (no padding)."""
    for size in sizes:
        if tokens <= size:
            return size
    return tokens


def pad_to_bucket(batch: dict[str, Any], sizes: tuple[int, ...], pad_token_id: int) -> dict[str, Any]:
    """A padding-free batch (one packed row) padded up to its bucket with one padding document."""
    ids = batch["input_ids"]
    if ids.shape[0] != 1 or "position_ids" not in batch:
        raise ValueError("bucketing pads packed (padding-free) batches: one row with position_ids")
    tokens = ids.shape[1]
    pad = bucket_for(tokens, sizes) - tokens
    out = dict(batch)
    out[PADDING_TOKENS] = pad
    out[PADDING_ROWS] = 1 if pad else 0
    if not pad:
        return out

    def grow(t: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, fill.to(t.dtype)[None]], dim=1)

    out["input_ids"] = grow(ids, torch.full((pad,), pad_token_id))
    out["labels"] = grow(batch["labels"], torch.full((pad,), -100))
    out["position_ids"] = grow(batch["position_ids"], torch.arange(pad))
    if "attention_mask" in batch:
        out["attention_mask"] = grow(batch["attention_mask"], torch.ones(pad))
    if "seq_idx" in batch:
        rows = int(batch["seq_idx"].max()) + 1 if batch["seq_idx"].numel() else 0
        out["seq_idx"] = grow(batch["seq_idx"], torch.full((pad,), rows))
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if key in batch:
            cu = batch[key]
            out[key] = torch.cat([cu, cu.new_tensor([tokens + pad])])
    for key in ("max_length_q", "max_length_k"):
        if key in batch:
            out[key] = max(int(batch[key]), pad)
    return out


class BucketedCollator:
    """Wraps a padding-free collator: each packed micro-batch comes out padded to its bucket."""

    def __init__(self, inner: Callable[[list], dict], sizes: tuple[int, ...], pad_token_id: int):
        self.inner = inner
        self.sizes = tuple(sizes)
        self.pad_token_id = int(pad_token_id)
        # what the probe and the planner read off a collator
        self.padding_free = True

    def __call__(self, features: list) -> dict[str, Any]:
        return pad_to_bucket(self.inner(features), self.sizes, self.pad_token_id)


def take_padding(inputs: dict[str, Any]) -> tuple[int, int]:
    """Pop the bucket padding a batch carries: (tokens, rows) that are not data."""
    return int(inputs.pop(PADDING_TOKENS, 0) or 0), int(inputs.pop(PADDING_ROWS, 0) or 0)
