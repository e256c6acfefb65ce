"""Token-balanced micro-batches: each optimizer step's rows split by tokens, sized for the run's
largest real micro-batch (sftop/engine/planner/token_split.py)."""

import math
import random

import pytest
from _shapes import llama_1b, one_gpu, preset

from sftop.engine.planner import plan_run
from sftop.engine.planner.solve import SplitByTokens, packed_token_bounds, size_for_data
from sftop.engine.planner.token_split import (
    epoch_order,
    epochs_covered,
    largest_micro_batch,
    split_bounds,
    split_step,
    step_batches,
)


def whole_run_lengths(n=2000, seed=42):
    """Chat rows as benchmarks/whole_run.py makes them: log-normal, median 300, mean 420, at most 2048."""
    rng = random.Random(seed)
    sigma = math.sqrt(2 * math.log(420 / 300))
    return [int(min(2048, max(30, round(rng.lognormvariate(math.log(300), sigma))))) for _ in range(n)]


def test_split_step_balances_tokens_and_keeps_every_row_once():
    lengths = [2048, 100, 300, 1500, 700, 50, 900, 400]
    groups = split_step(lengths, 2)
    assert sorted(p for g in groups for p in g) == list(range(8))
    loads = [sum(lengths[p] for p in g) for g in groups]
    assert loads == [2048 + 700 + 300, 1500 + 900 + 400 + 100 + 50]  # longest first, each to the lighter group
    assert max(loads) - min(loads) <= max(lengths)
    assert split_step(lengths, 1) == [list(range(8))]
    assert split_step([5, 7], 4) == [[1], [0]]  # never an empty micro-batch
    assert split_step([], 3) == []


def test_effective_batch_stays_exact_and_order_is_seeded_per_epoch():
    lengths = whole_run_lengths(203)
    for parts in (1, 2, 4, 8):
        steps = list(step_batches(lengths, 8, parts, seed=7, epoch=0))
        assert len(steps) == 26  # 25 full steps of 8 rows, one of 3
        assert [sum(len(g) for g in s) for s in steps] == [8] * 25 + [3]
        assert all(len(s) == parts for s in steps[:-1]) and len(steps[-1]) == min(3, parts)
        assert sorted(i for s in steps for g in s for i in g) == list(range(203))
    assert epoch_order(50, 7, 0) == epoch_order(50, 7, 0) != epoch_order(50, 7, 1)
    assert epoch_order(50, 8, 0) != epoch_order(50, 7, 0)


def test_bounds_are_the_largest_micro_batch_that_really_occurs():
    lengths = whole_run_lengths(500)
    bounds = split_bounds(lengths, 8, seed=3, epochs=2, multiple=128)
    assert bounds[4] == bounds[5] == bounds[6] == 0  # 5, 6, 7 do not divide 8
    for b in (1, 2, 4, 8):
        seen = max(
            sum(lengths[i] for i in g) for e in range(2) for s in step_batches(lengths, 8, 8 // b, 3, e) for g in s
        )
        assert bounds[b - 1] == -(-seen // 128) * 128
        assert bounds[b - 1] <= packed_token_bounds(lengths, 8, 128)[b - 1] or b == 8
    assert largest_micro_batch(lengths, 8, 1, 3, 1) < sum(sorted(lengths)[-8:])  # far below the 8 longest rows


def test_epochs_covered():
    assert epochs_covered(100, 8, 1.0, None) == 1
    assert epochs_covered(100, 8, 2.5, None) == 3
    assert epochs_covered(100, 8, 1.0, 13) == 1 and epochs_covered(100, 8, 1.0, 14) == 2


def test_planner_splits_by_tokens_under_a_cap_where_rows_took_2_x_4():
    lengths = whole_run_lengths()
    worst = plan_run(preset(effective_batch=8, max_memory_gib=4), llama_1b(), gpus=one_gpu(80))
    by_rows = size_for_data(worst, lengths)
    by_tokens = size_for_data(worst, lengths, split=SplitByTokens(seed=42, epochs=1))
    assert (by_rows.split_by, by_rows.micro_batch, by_rows.grad_accum) == ("rows", 2, 4)
    assert by_tokens.split_by == "tokens" and by_tokens.grad_accum < 4
    assert by_tokens.micro_batch * by_tokens.grad_accum == 8  # the effective batch stays exact
    assert by_tokens.predicted_peak_gib <= by_tokens.budget_gib == 4.0
    assert by_tokens.modelled_step_s < 0.8 * by_rows.modelled_step_s
    largest = largest_micro_batch(lengths, 8, by_tokens.grad_accum, 42, 1)
    assert by_tokens.tokens_per_micro_batch == largest  # sized for the largest micro-batch, never under
    assert by_tokens.describe().startswith(
        f"8 rows/step in {by_tokens.grad_accum} micro-batch{'es' if by_tokens.grad_accum > 1 else ''} "
        f"of <= {largest:,} tokens"
    )
    assert by_tokens.to_dict()["split_by"] == "tokens"


def test_uncapped_plan_is_sized_for_the_real_largest_step_not_the_8_longest_rows():
    lengths = whole_run_lengths()
    plan = size_for_data(
        plan_run(preset(effective_batch=8), llama_1b(), gpus=one_gpu(80)),
        lengths,
        split=SplitByTokens(seed=42, epochs=1),
    )
    assert (plan.micro_batch, plan.gradient_checkpointing) == (8, "off")
    assert plan.tokens_per_micro_batch == largest_micro_batch(lengths, 8, 1, 42, 1)
    assert plan.tokens_per_micro_batch < 0.6 * packed_token_bounds(lengths, 8)[-1]


def test_step_down_keeps_the_token_split():
    from sftop.engine.planner.verify import step_down

    lengths = whole_run_lengths()
    plan = size_for_data(
        plan_run(preset(effective_batch=8), llama_1b(), gpus=one_gpu(80)),
        lengths,
        split=SplitByTokens(seed=42, epochs=1),
    )
    smaller = step_down(plan, "test")
    assert (smaller.split_by, smaller.grad_accum) == ("tokens", 2)
    assert smaller.tokens_per_micro_batch == largest_micro_batch(lengths, 8, 2, 42, 1)


@pytest.mark.parametrize("setting", ["rows", "auto"])
def test_preset_key(setting):
    from sftop.engine.presets import load_preset

    p, _ = load_preset("demo", [f'plan.split_by="{setting}"'])
    assert p.plan.split_by == setting


def test_sftop_plan_reads_the_data_and_shows_the_split(home, capsys):
    from sftop.cli import main

    assert main(["plan", "demo"]) == 0  # without --data: sized for max_length, and says how to see more
    text = capsys.readouterr().out
    assert "sized for data.max_length" in text and "sftop plan --data" in text and "sized for the data:" not in text
    assert main(["plan", "demo", "--data"]) == 0
    text = capsys.readouterr().out
    assert "16 rows/step in 1 micro-batch of <= " in text and "split by tokens" in text
    assert "sized for the data:" in text
    assert main(["plan", "demo", "--data", "--set", 'plan.split_by="rows"']) == 0
    text = capsys.readouterr().out
    assert "micro-batch      16 rows (packed, up to " in text and "split by tokens" not in text


def test_buckets_fitted_to_every_micro_batch_of_a_split_run():
    from sftop.engine.planner.token_split import micro_batch_tokens
    from sftop.engine.train.buckets import fitted_bucket_sizes

    lengths = whole_run_lengths()
    run = micro_batch_tokens(lengths, 8, 2, seed=42, epochs=1)
    assert len(run) == 500 and sum(run) == sum(lengths)  # every row once, 2 micro-batches per step
    assert max(run) == largest_micro_batch(lengths, 8, 2, 42, 1)
    sizes = fitted_bucket_sizes(run, len(run))
    assert 2 <= len(sizes) <= 8 and all(s % 128 == 0 for s in sizes)
    held = sum(n <= sizes[-1] for n in run)
    assert held >= 0.99 * len(run)  # the rare longest run unpadded
    assert fitted_bucket_sizes(run[:20], 20) == ()  # too few micro-batches to pay for captures
