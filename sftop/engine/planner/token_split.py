"""Token-balanced micro-batches: an optimizer step's rows split by tokens, not by row count.

Why: with packing, a micro-batch of `b` rows holds anywhere from `b` short rows to `b` rows of
`max_length`, so a plan sized by rows must be sized for the worst `b` rows, and a small GPU (or a
memory cap) drops to many small micro-batches that run far below the GPU's rate. Instead, each
optimizer step takes exactly `effective_batch` rows (the effective batch stays exact) and splits
them into `k` micro-batches of about equal tokens. The loss is normalised by the step's label
tokens, not per micro-batch (transformers' `num_items_in_batch`), so the step's loss and gradients
equal those of one micro-batch holding all its rows.

The order of rows is sftop's own (a seeded shuffle per epoch), so before training the planner knows
every micro-batch of the run and sizes memory for the largest one that will really occur, not for
the `b` longest rows of the data. Pure Python: the planner imports it without torch.

Equal-token steps (train.equal_token_steps, on by default): instead of consecutive rows of the
shuffle, each epoch's full steps are composed so that every one holds about the same number of
tokens (`epoch_steps`). Random steps of 8 chat rows (median 300 tokens) hold anywhere from about
1,700 to 6,800 tokens; composed, they differ by a few hundred. So every micro-batch of the run is
about as long as the others: one or two CUDA-graph length buckets instead of four or more, less
padding, and a smaller largest micro-batch for the planner to size memory for.
"""

from __future__ import annotations

import heapq
import random
from typing import Iterator, Sequence


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The row indices of one epoch, shuffled by (seed, epoch): the same on every machine and resume."""
    order = list(range(rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def split_step(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Positions 0..n-1 of a step's rows in min(parts, n) non-empty groups of about equal tokens.

    Longest row first, each to the group with the fewest tokens so far (ties: the lower group), so
    the largest group is at most the balanced share plus one row. Groups keep the rows' order.
    """
    n = len(lengths)
    if n == 0:
        return []
    parts = max(1, min(parts, n))
    groups: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0, j) for j in range(parts)]  # (tokens so far, group): the lightest, then the lowest group
    for pos in sorted(range(n), key=lambda i: (-int(lengths[i]), i)):
        load, g = heapq.heappop(heap)
        groups[g].append(pos)
        heapq.heappush(heap, (load + int(lengths[pos]), g))
    return [sorted(g) for g in groups]


def largest_part(lengths: Sequence[int], parts: int) -> int:
    """Tokens of the largest group `split_step` makes, without building the groups."""
    n = len(lengths)
    if n == 0:
        return 0
    if parts >= n:
        return max(int(x) for x in lengths)
    if parts <= 1:
        return sum(int(x) for x in lengths)
    heap = [0] * parts
    for x in sorted((int(v) for v in lengths), reverse=True):
        heapq.heapreplace(heap, heap[0] + x)
    return max(heap)


# Rows are taken longest first by their length in grains of this many tokens, and among rows of one
# grain in their shuffled order. Exact lengths would make each step's rows a function of the rows'
# length ranks alone, the same every epoch: of the row pairs that share a step in one epoch, about a
# third shared one in the epoch before (1,000 chat rows, 8 a step). In 64-token grains the shuffle
# decides among rows of about one length, and about 1 % do, as with unbalanced steps; the steps'
# spread grows from about 115 tokens to about 240 (a 128-token length bucket holds either).
STEP_GRAIN_TOKENS = 64


def epoch_steps(
    lengths: Sequence[int], rows_per_step: int, seed: int, epoch: int, balanced: bool = True
) -> list[list[int]]:
    """The row indices of every optimizer step of one epoch, in training order: the one place that
    decides which rows a step holds, for the trainer's sampler and the planner alike.

    Each full step holds exactly `rows_per_step` rows and every row comes once; a last step of the
    remaining rows (fewer than `rows_per_step`) is the last rows of `epoch_order` and comes last.
    balanced=False: consecutive rows of `epoch_order`. balanced=True: the full steps' rows are dealt
    out longest first (by STEP_GRAIN_TOKENS, then by shuffled position), each to the step with the
    fewest tokens so far among those not yet full, so every full step holds about the same tokens
    (on chat rows a few hundred apart, far less than the longest row); within a step rows keep their
    shuffled order, and the steps come in an order shuffled by (seed, epoch), so long and short
    steps follow no pattern.

    One window for the whole epoch, not windows of a few steps: windows leave each window's mean
    to chance (8 random rows vary by about 2.8 rows' standard deviation, a window of w steps by that
    over sqrt(w)), and the equal sums are the point: on 1,000 chat rows, windows of 64 steps spread
    the steps over about 560 tokens, in two buckets padding 5 %, and windows of 16 over about 950;
    the whole epoch over about 240 tokens, in one bucket padding 4 %, with the smallest largest
    step. What windows would add, other rows meeting each epoch, the grains give (STEP_GRAIN_TOKENS).
    Deterministic from (seed, epoch): a resume and the planner see the trainer's steps. O(n log n):
    a sort and a heap.
    """
    rows = len(lengths)
    order = epoch_order(rows, seed, epoch)
    full = rows // rows_per_step * rows_per_step
    if not balanced:
        return [order[start : start + rows_per_step] for start in range(0, rows, rows_per_step)]
    count = full // rows_per_step
    steps: list[list[int]] = [[] for _ in range(count)]
    # the steps not yet full, as tokens so far * count + step: the lightest, then the lowest step
    heap = list(range(count))
    tokens = [int(lengths[i]) for i in order[:full]]
    grains = [-(n // STEP_GRAIN_TOKENS) for n in tokens]
    for pos in sorted(range(full), key=grains.__getitem__):  # stable: a grain's rows in shuffled order
        s = heap[0] % count
        steps[s].append(pos)
        if len(steps[s]) < rows_per_step:
            heapq.heapreplace(heap, heap[0] + tokens[pos] * count)
        else:
            heapq.heappop(heap)  # a full step leaves the heap for good
    composed = [[order[p] for p in sorted(step)] for step in steps]
    random.Random(f"sftop-steps:{seed}:{epoch}").shuffle(composed)  # not the rows' stream
    if full < rows:
        composed.append(order[full:])
    return composed


def step_batches(
    lengths: Sequence[int], rows_per_step: int, parts: int, seed: int, epoch: int, balanced: bool = True
) -> Iterator[list[list[int]]]:
    """The micro-batches (lists of row indices) of every optimizer step of one epoch, in order: each
    step of `epoch_steps` split into `parts` token-balanced micro-batches.

    A last step with fewer rows than `parts` has one micro-batch per row.
    """
    for step in epoch_steps(lengths, rows_per_step, seed, epoch, balanced):
        yield [[step[p] for p in group] for group in split_step([lengths[i] for i in step], parts)]


def largest_micro_batch(
    lengths: Sequence[int],
    rows_per_step: int,
    parts: int,
    seed: int,
    epochs: int,
    multiple: int = 1,
    balanced: bool = True,
) -> int:
    """The most tokens any micro-batch of the run will hold (epochs 0..epochs-1), rounded up to
    `multiple` (the trainer's length-bucket padding)."""
    return split_bounds_for(lengths, rows_per_step, [parts], seed, epochs, multiple, balanced)[parts]


def micro_batch_tokens(
    lengths: Sequence[int], rows_per_step: int, parts: int, seed: int, epochs: int, balanced: bool = True
) -> list[int]:
    """The tokens of every micro-batch of the run, in order (for fitting length buckets to them)."""
    return [
        sum(int(lengths[i]) for i in group)
        for epoch in range(max(1, epochs))
        for step in step_batches(lengths, rows_per_step, parts, seed, epoch, balanced)
        for group in step
    ]


def split_bounds_for(
    lengths: Sequence[int],
    rows_per_step: int,
    parts: Sequence[int],
    seed: int,
    epochs: int,
    multiple: int = 1,
    balanced: bool = True,
) -> dict[int, int]:
    """{k: the run's largest micro-batch with each step split into k} over epochs 0..epochs-1, each
    rounded up to `multiple`; one pass over the run's steps for all k."""
    most = {k: 0 for k in parts}
    for epoch in range(max(1, epochs)):
        for rows in epoch_steps(lengths, rows_per_step, seed, epoch, balanced):
            step = [lengths[i] for i in rows]
            for k in most:
                most[k] = max(most[k], largest_part(step, k))
    return {k: -(-v // multiple) * multiple for k, v in most.items()}


def split_bounds(
    lengths: Sequence[int], rows_per_step: int, seed: int, epochs: int, multiple: int = 1, balanced: bool = True
) -> tuple[int, ...]:
    """bounds[b - 1]: the run's largest micro-batch when each step is split into rows_per_step / b
    token-balanced micro-batches (b rows each on average), for every b that divides rows_per_step;
    0 for the others (the planner only makes micro-batches that keep the effective batch exact)."""
    sizes = [b for b in range(1, rows_per_step + 1) if rows_per_step % b == 0]
    found = split_bounds_for(
        lengths, rows_per_step, [rows_per_step // b for b in sizes], seed, epochs, multiple, balanced
    )
    return tuple(found[rows_per_step // b] if rows_per_step % b == 0 else 0 for b in range(1, rows_per_step + 1))


def epochs_covered(rows: int, rows_per_step: int, epochs: float, max_steps: int | None) -> int:
    """How many epochs' orders a run reaches: train.max_steps when set (it may run past one
    epoch), else train.epochs rounded up."""
    steps_per_epoch = max(1, -(-rows // rows_per_step))
    if max_steps:
        return max(1, -(-int(max_steps) // steps_per_epoch))
    return max(1, int(-(-float(epochs) // 1)))
