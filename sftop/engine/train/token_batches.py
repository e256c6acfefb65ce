"""The trainer's side of token-balanced micro-batches (sftop/engine/planner/token_split.py).

`TokenBalancedSampler` yields the row indices of each micro-batch: every optimizer step takes its
`rows_per_step` rows from sftop's seeded epoch order (`epoch_steps`: steps of about equal tokens
with train.equal_token_steps on, else consecutive rows) and splits them into `micro_batches` groups
of about equal tokens. transformers' Trainer passes a `BatchRebalanceSampler` to its DataLoader as
the batch sampler and calls `set_epoch` on it each epoch; on resume accelerate skips the micro-batches
already trained, which lands on the same rows because the order depends only on (seed, epoch).
The step's loss is normalised by all its label tokens (the Trainer's `num_items_in_batch`), so
splitting changes memory and speed, never the numbers.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from transformers.trainer_pt_utils import BatchRebalanceSampler

from sftop.engine.planner.token_split import step_batches


class TokenBalancedSampler(BatchRebalanceSampler):
    """Batch sampler: per optimizer step, `rows_per_step` rows in `micro_batches` token-balanced groups.

    A subclass of transformers' BatchRebalanceSampler only so the Trainer hands it to its DataLoader
    as `batch_sampler`; the grouping is sftop's. Single process only (each rank would see every group).
    """

    def __init__(
        self, lengths: Sequence[int], rows_per_step: int, micro_batches: int, seed: int, *, balanced: bool = True
    ):
        if rows_per_step < 1 or micro_batches < 1 or micro_batches > rows_per_step:
            raise ValueError(f"need 1 <= micro_batches ({micro_batches}) <= rows_per_step ({rows_per_step})")
        self.lengths = [int(n) for n in lengths]
        self.rows_per_step = rows_per_step
        self.micro_batches = micro_batches
        self.seed = seed
        self.balanced = balanced  # equal-token steps (train.equal_token_steps), as the planner sized them
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        for step in step_batches(
            self.lengths, self.rows_per_step, self.micro_batches, self.seed, self.epoch, self.balanced
        ):
            yield from step

    def __len__(self) -> int:
        """Micro-batches per epoch; a last partial step has one per row when it has fewer rows than
        `micro_batches` (the Trainer accumulates that remainder as its last step)."""
        full, tail = divmod(len(self.lengths), self.rows_per_step)
        return full * self.micro_batches + min(tail, self.micro_batches)
