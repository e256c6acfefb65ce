"""Packed plans sized from the rows' real lengths: the longest micro-batch of b rows is the b
longest rows, not b x max_length."""

import pytest
from _shapes import llama_1b, one_gpu, preset

from sftop.engine.planner import plan_run
from sftop.engine.planner.solve import packed_token_bounds, size_for_data


def test_bounds_are_the_longest_rows_rounded_to_the_bucket_multiple():
    lengths = [300, 2048, 90, 1200, 512]
    assert packed_token_bounds(lengths, 3) == (2048, 3248, 3760)
    assert packed_token_bounds(lengths, 3, multiple=128) == (2048, 3328, 3840)
    assert packed_token_bounds(lengths, 9) == (2048, 3248, 3760, 4060, 4150)


def chat_lengths():
    """Chat rows of about 300 tokens (at most 1,200) under data.max_length = 2048: the usual case of
    a max_length set generously for rows that are mostly short."""
    import random

    rng = random.Random(0)
    return [min(1200, max(40, int(rng.lognormvariate(5.7, 0.5)))) for _ in range(2000)]


def test_short_rows_get_a_bigger_plan_under_a_small_cap():
    lengths = chat_lengths()
    worst = plan_run(preset(effective_batch=8, max_memory_gib=4), llama_1b(), gpus=one_gpu(80))
    sized = size_for_data(worst, lengths, multiple=128)
    bounds = packed_token_bounds(lengths, 8, multiple=128)
    assert sized.tokens_per_micro_batch == bounds[sized.micro_batch - 1] < sized.micro_batch * 2048
    assert sized.predicted_peak_gib <= sized.budget_gib == 4.0
    # the same budget buys more rows per micro-batch, or less recomputation, or a faster plan
    assert sized.modelled_step_s < worst.modelled_step_s
    assert (sized.micro_batch, sized.gradient_checkpointing) != (worst.micro_batch, worst.gradient_checkpointing)


def test_never_sized_under_the_longest_micro_batch_and_unchanged_without_packing():
    lengths = [2048] * 8 + [100] * 100
    plan = plan_run(preset(effective_batch=8), llama_1b(), gpus=one_gpu(24))
    sized = size_for_data(plan, lengths)
    assert sized.tokens_per_micro_batch == sized.micro_batch * 2048  # the 8 longest rows are full length
    same = [
        c
        for c in plan.candidates
        if (c["micro_batch"], c["gradient_checkpointing"], c["checkpoint_every_n_layers"])
        == (sized.micro_batch, sized.gradient_checkpointing, sized.checkpoint_every_n_layers)
    ]
    assert same and same[0]["predicted_peak_gib"] == pytest.approx(sized.predicted_peak_gib, abs=1e-3)
    padded = plan_run(preset(effective_batch=8, packing=False), llama_1b(), gpus=one_gpu(24))
    assert size_for_data(padded, lengths) is padded
