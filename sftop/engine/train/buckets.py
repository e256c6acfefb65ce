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

import itertools
import math
import random
from typing import Any, Callable

import torch

# Keys the collator adds and the trainer pops before the forward.
PADDING_TOKENS = "sftop_padding_tokens"
PADDING_ROWS = "sftop_padding_rows"
# Bucket lengths are multiples of this: tensor-core friendly, and few enough distinct shapes.
BUCKET_MULTIPLE = 128
# Successive buckets grow by this factor: a batch is padded by at most 19% (about 9% on average),
# and a plan's range of packed lengths (an eighth of its largest to the largest) takes 13 buckets.
BUCKET_RATIO = 2**0.25
SMALLEST_SHARE = 1 / 8


def bucket_sizes(
    max_tokens: int,
    ratio: float = BUCKET_RATIO,
    smallest_share: float = SMALLEST_SHARE,
    multiple: int = BUCKET_MULTIPLE,
) -> tuple[int, ...]:
    """Lengths from about smallest_share x max_tokens up to max_tokens, each `ratio` times the one
    below and a multiple of `multiple`.

    The largest holds the plan's largest packed micro-batch, so every batch has a bucket; batches
    shorter than the smallest are padded up to it (they are rare: a micro-batch packs several rows).
    """
    if max_tokens < 1 or ratio <= 1 or not 0 < smallest_share <= 1:
        raise ValueError(
            f"need max_tokens >= 1, ratio > 1 and 0 < smallest_share <= 1; got {max_tokens}, {ratio}, {smallest_share}"
        )
    top = -(-max_tokens // multiple) * multiple
    sizes = {top}
    size = float(top)
    while size / ratio >= top * smallest_share:
        size /= ratio
        sizes.add(max(multiple, -(-int(size) // multiple) * multiple))
    return tuple(sorted(sizes))


def buckets_wanted(setting: str, graphs_on: bool) -> bool:
    """train.length_buckets: "on", "off", or "auto" (wherever packed micro-batches can replay CUDA
    graphs; `data_bucket_sizes` then decides from the run's data whether any bucket pays for its
    capture, and a run too short for that trains unpadded)."""
    return setting == "on" or (setting == "auto" and graphs_on)


# A bucket's capture costs about eight replayed micro-batches of the run's mean length
# (docs/benchmarks.md, 2026-12-07: 8 captures in 3.19 s against a median replayed step of 48.5 ms,
# 1B on an H100; the capture step's own batch then replays), and a replay saves about 40 % of an
# eager step (steady-state steps of 54,400 against 31,500 tokens/s), so a bucket pays for itself
# after a dozen replays or so: it is only made where the run is expected to fill it that often.
MIN_REPLAYS_PER_BUCKET = 12
CAPTURE_COST_MICRO_BATCHES = 8
# What an eager micro-batch costs beyond a replayed one of the same tokens, as a share of it.
EAGER_EXTRA_SHARE = 0.7
MAX_DATA_BUCKETS = 8  # packed_graphs.MAX_BUCKET_GRAPHS: more could not all be captured
# Padding is GPU time spent on nothing: past this share of the tokens no bucket count is worth it.
MAX_PADDING_SHARE = 0.25
TOP_SHARE = 0.995  # micro-batches above the largest bucket (the rarest, longest) run unpadded, eagerly
SAMPLED_BATCHES = 4096


def data_bucket_sizes(
    lengths,
    rows_per_micro_batch: int,
    micro_batches: int,
    *,
    seed: int = 0,
    max_buckets: int = MAX_DATA_BUCKETS,
    min_replays: int = MIN_REPLAYS_PER_BUCKET,
    multiple: int = BUCKET_MULTIPLE,
) -> tuple[int, ...]:
    """Bucket lengths fitted to this run: the fewest padding tokens over its micro-batches, with each
    bucket expected to be used at least `min_replays` times in `micro_batches` micro-batches.

    A packed micro-batch holds `rows_per_micro_batch` rows drawn at random, so its length is a sum of
    that many row lengths; that distribution is sampled (seeded) and split into at most
    `max_buckets` contiguous ranges, each padded up to its upper end, by dynamic programming over
    the multiples of `multiple`. Returns () when the run is too short for two buckets to pay for
    their captures, or when the buckets it can afford would pad more than `MAX_PADDING_SHARE` of the
    tokens (it then trains unpadded and eagerly, which is faster there)."""
    rows = [int(n) for n in lengths if int(n) > 0]
    if min(max_buckets, micro_batches // max(1, min_replays)) < 2 or not rows:
        return ()
    rng = random.Random(seed)
    take = min(rows_per_micro_batch, len(rows))
    sums = [sum(rng.sample(rows, take)) for _ in range(SAMPLED_BATCHES)]
    return fitted_bucket_sizes(sums, micro_batches, max_buckets=max_buckets, min_replays=min_replays, multiple=multiple)


def fitted_bucket_sizes(
    batch_tokens,
    micro_batches: int,
    *,
    max_buckets: int = MAX_DATA_BUCKETS,
    min_replays: int = MIN_REPLAYS_PER_BUCKET,
    multiple: int = BUCKET_MULTIPLE,
) -> tuple[int, ...]:
    """`data_bucket_sizes` from micro-batch lengths already known: sampled ones, or every micro-batch
    of a run whose steps are split by tokens (sftop/engine/planner/token_split.py).

    How many: the count with the least time in padding and captures together, each capture
    counted as `CAPTURE_COST_MICRO_BATCHES` micro-batches of the mean length: more buckets pad less
    but capture more, and a short run cannot earn back eight captures (1,000 chat-like rows of
    median 300 tokens in 125 micro-batches pad 8.4 % with eight and 15.7 % with four, and the four
    cost about 20 micro-batches less). None where even the best count costs more than training
    unpadded and eagerly, or would pad more than `MAX_PADDING_SHARE` of the tokens."""
    count = min(max_buckets, micro_batches // max(1, min_replays))
    sums = sorted(int(n) for n in batch_tokens)
    if count < 2 or not sums:
        return ()
    top = sums[min(len(sums) - 1, math.ceil(TOP_SHARE * len(sums)) - 1)]
    covered = [n for n in sums if n <= top]
    least = math.ceil(min_replays * len(sums) / micro_batches)  # samples a bucket must hold
    tokens = sum(covered)
    # a capture in the samples' units: the run has micro_batches of them, the samples len(sums)
    per_capture = CAPTURE_COST_MICRO_BATCHES * tokens / len(covered) * len(sums) / micro_batches
    sizes, padding = fewest_padding_split(covered, count, least, multiple, per_bucket=per_capture)
    bucketed = padding + len(sizes) * per_capture
    if not sizes or padding > MAX_PADDING_SHARE * tokens or bucketed >= EAGER_EXTRA_SHARE * tokens:
        return ()
    return sizes


def fewest_padding_split(
    lengths: list[int], most: int, least: int, multiple: int, per_bucket: float = 0.0
) -> tuple[tuple[int, ...], float]:
    """At most `most` bucket sizes (multiples of `multiple`) that hold every one of `lengths` with the
    fewest padding tokens in all, each bucket holding at least `least` of them; ((), inf) if none can.
    `per_bucket`: what each bucket costs besides its padding, in padding tokens: the count chosen
    is the one with the least padding plus that cost (the padding is returned).

    Buckets end at a rounded-up length (any other end pads more), so the search runs over those
    candidates: best[k][j] is the least padding of the lengths up to candidate j in k buckets, the
    last ending at j."""
    sizes: list[int] = []
    held: list[int] = []
    total: list[int] = []
    for n in sorted(lengths):
        size = -(-n // multiple) * multiple
        if not sizes or sizes[-1] != size:
            sizes.append(size)
            held.append(0)
            total.append(0)
        held[-1] += 1
        total[-1] += n
    c = len(sizes)
    upto_n = list(itertools.accumulate(held, initial=0))
    upto_t = list(itertools.accumulate(total, initial=0))

    def padding(i: int, j: int) -> int:  # one bucket of sizes[j] taking candidates i..j
        return sizes[j] * (upto_n[j + 1] - upto_n[i]) - (upto_t[j + 1] - upto_t[i])

    inf = float("inf")
    best: list[list[float]] = [[inf] * c for _ in range(most + 1)]
    back = [[-1] * c for _ in range(most + 1)]
    for j in range(c):
        if upto_n[j + 1] >= least:
            best[1][j] = padding(0, j)
    for k in range(2, most + 1):
        for j in range(c):
            for i in range(j):
                if best[k - 1][i] == inf or upto_n[j + 1] - upto_n[i + 1] < least:
                    continue
                cost = best[k - 1][i] + padding(i + 1, j)
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    if c == 0:
        return (), inf
    k = min(range(1, most + 1), key=lambda kk: best[kk][c - 1] + kk * per_bucket)
    cost = best[k][c - 1]
    if cost == inf:
        return (), inf
    chosen, j = [], c - 1
    while k >= 1:
        chosen.append(sizes[j])
        j, k = back[k][j], k - 1
    return tuple(sorted(chosen)), cost


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
