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
    epoch_steps,
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


def test_equal_token_steps_keep_the_effective_batch_and_every_row_once():
    lengths = whole_run_lengths(203)
    order = epoch_order(203, 7, 0)
    steps = epoch_steps(lengths, 8, seed=7, epoch=0, balanced=True)
    assert [len(s) for s in steps] == [8] * 25 + [3]
    assert sorted(i for s in steps for i in s) == list(range(203))
    assert steps[-1] == order[200:]  # the partial step: the order's last rows, last, as without balancing
    position = {row: p for p, row in enumerate(order)}
    assert all([position[i] for i in s] == sorted(position[i] for i in s) for s in steps)  # rows keep their order
    assert sorted(map(sorted, steps[:-1])) != sorted(sorted(order[i : i + 8]) for i in range(0, 200, 8))
    # deterministic from (seed, epoch), another for another epoch or seed
    assert epoch_steps(lengths, 8, 7, 0, True) == steps
    assert epoch_steps(lengths, 8, 7, 1, True) != steps and epoch_steps(lengths, 8, 8, 0, True) != steps
    exact = epoch_steps(lengths[:200], 8, 7, 0, True)  # no partial step
    assert [len(s) for s in exact] == [8] * 25 and sorted(i for s in exact for i in s) == list(range(200))
    assert epoch_steps(lengths[:5], 8, 7, 0, True) == [epoch_order(5, 7, 0)]  # only a partial step


def test_unbalanced_steps_are_consecutive_rows_of_the_order():
    """train.equal_token_steps = "off": the steps sftop took before equal-token steps existed."""
    lengths = whole_run_lengths(203)
    for epoch in (0, 1):
        order = epoch_order(203, 7, epoch)
        slices = [order[i : i + 8] for i in range(0, 203, 8)]
        assert epoch_steps(lengths, 8, 7, epoch, balanced=False) == slices
        assert list(step_batches(lengths, 8, 2, 7, epoch, balanced=False)) == [
            [[s[p] for p in g] for g in split_step([lengths[i] for i in s], 2)] for s in slices
        ]


def test_equal_token_steps_hold_about_equal_tokens():
    """1,000 chat rows (median 300 tokens, at most 2,048), 8 a step: random steps hold 1,680 to
    6,832 tokens, equal-token ones 3,211 to 3,447; every epoch alike."""
    lengths = whole_run_lengths(1000)

    def sums(balanced, epoch):
        return [sum(lengths[i] for i in s) for s in epoch_steps(lengths, 8, 42, epoch, balanced)]

    random_steps, equal_steps = sums(False, 0), sums(True, 0)
    assert (min(random_steps), max(random_steps)) == (1680, 6832)
    assert (min(equal_steps), max(equal_steps)) == (3211, 3447)
    for epoch in (1, 2):
        spread = max(sums(True, epoch)) - min(sums(True, epoch))
        assert spread <= 300 < 4000 <= max(sums(False, epoch)) - min(sums(False, epoch))
        assert spread <= max(lengths) // 4
        assert max(sums(True, epoch)) < max(sums(False, epoch))
    assert sorted(equal_steps) != equal_steps  # long and short steps come shuffled, not in a fixed pattern


def test_equal_token_steps_mix_other_rows_each_epoch():
    """Steps composed from the rows' length ranks alone would pair the same rows every epoch; with
    lengths compared in 64-token grains, about as few row pairs meet again as with random steps."""
    lengths = whole_run_lengths(1000)

    def pairs(steps):
        return {(a, b) for s in steps for a in s for b in s if a < b}

    for balanced in (True, False):
        first, second = (pairs(epoch_steps(lengths, 8, 42, e, balanced)) for e in (0, 1))
        assert len(first & second) < 0.02 * len(first)


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


def test_plan_is_sized_for_the_largest_equal_token_micro_batch():
    """Equal-token steps' largest micro-batch is far below random steps' (3,421 tokens against
    7,363 in one micro-batch a step): under a 4 GiB cap the plan then takes a step in one
    micro-batch where random steps needed two."""
    lengths = whole_run_lengths()
    capped = plan_run(preset(effective_batch=8, max_memory_gib=4), llama_1b(), gpus=one_gpu(80))
    equal = size_for_data(capped, lengths, split=SplitByTokens(seed=42, epochs=1, balanced=True))
    mixed = size_for_data(capped, lengths, split=SplitByTokens(seed=42, epochs=1, balanced=False))
    assert (equal.split_by, equal.grad_accum, equal.tokens_per_micro_batch) == ("tokens", 1, 3421)
    assert (mixed.split_by, mixed.grad_accum, mixed.tokens_per_micro_batch) == ("tokens", 2, 3736)
    assert equal.tokens_per_micro_batch == largest_micro_batch(lengths, 8, 1, 42, 1, balanced=True)
    assert mixed.tokens_per_micro_batch == largest_micro_batch(lengths, 8, 2, 42, 1, balanced=False)
    assert equal.predicted_peak_gib <= 4.0 and equal.modelled_step_s < mixed.modelled_step_s
    uncapped = plan_run(preset(effective_batch=8), llama_1b(), gpus=one_gpu(80))
    sizes = [
        size_for_data(uncapped, lengths, split=SplitByTokens(seed=42, epochs=1, balanced=b)).tokens_per_micro_batch
        for b in (True, False)
    ]
    assert sizes == [3421, 7363]


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


def test_equal_token_steps_key_defaults_on_and_reaches_the_planners_split(monkeypatch):
    from sftop.engine.errors import PresetError
    from sftop.engine.presets import load_preset
    from sftop.engine.train.plan_data import token_split_for

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    default, _ = load_preset("demo")
    assert default.train.equal_token_steps == "on"
    split = token_split_for(default, 100, 8)
    assert split is not None and split.balanced is True
    off, _ = load_preset("demo", ['train.equal_token_steps="off"'])
    split = token_split_for(off, 100, 8)
    assert split is not None and split.balanced is False
    with pytest.raises(PresetError, match="equal_token_steps"):
        load_preset("demo", ['train.equal_token_steps="yes"'])


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
