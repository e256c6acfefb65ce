"""Packed micro-batches padded to length buckets: the padding is never trained on and never counted."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftop.engine.train.buckets import (
    PADDING_ROWS,
    PADDING_TOKENS,
    BucketedCollator,
    bucket_for,
    bucket_sizes,
    data_bucket_sizes,
    fewest_padding_split,
    fitted_bucket_sizes,
    pad_to_bucket,
)
from sftop.engine.train.runner import _Run
from train_helpers import events_of, fast_preset, of_type, prepared_run


def test_bucket_sizes_cover_the_plan_with_bounded_padding():
    sizes = bucket_sizes(8 * 2048)
    assert sizes[-1] == 16384 and sizes[0] == 2048 and list(sizes) == sorted(set(sizes))
    assert all(s % 128 == 0 for s in sizes)
    assert all(b / a <= 2**0.25 + 128 / a for a, b in zip(sizes, sizes[1:]))
    assert bucket_sizes(1000)[-1] == 1024  # the largest packed batch always has a bucket
    assert bucket_for(2049, sizes) == 2560 and bucket_for(2048, sizes) == 2048 and bucket_for(1, sizes) == 2048
    assert bucket_for(20000, sizes) == 20000  # past the largest: left as it is
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_padding_is_one_extra_document_without_labels():
    inner = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    plain = inner(rows)
    out = BucketedCollator(inner, (8, 16), pad_token_id=3)(rows)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 3, 3]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert out["cu_seq_lens_q"].tolist() == out["cu_seq_lens_k"].tolist() == [0, 3, 5, 8]
    assert out["cu_seq_lens_q"].dtype == plain["cu_seq_lens_q"].dtype
    assert out["max_length_q"] == out["max_length_k"] == 3
    assert out["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert (out[PADDING_TOKENS], out[PADDING_ROWS]) == (3, 1)
    exact = pad_to_bucket(inner(rows), (5,), pad_token_id=3)
    assert exact["input_ids"].tolist() == plain["input_ids"].tolist() and exact[PADDING_TOKENS] == 0
    with pytest.raises(ValueError, match="packed"):
        pad_to_bucket({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, (8,), 0)


def test_bucket_padding_changes_neither_loss_nor_gradients_nor_counted_tokens(home, tmp_path):
    run, writer = prepared_run(fast_preset('train.length_buckets="on"', "train.max_steps=1"), tmp_path / "run")
    trainer = run.build_trainer()
    collator = trainer.data_collator
    # the plan is sized for the data: the 4 longest rows, rounded up to the bucket multiple
    import pyarrow.compute as pc

    lengths = sorted(pc.list_value_length(run.data.train.data.column("input_ids")).to_pylist())
    assert run.plan.tokens_per_micro_batch == -(-sum(lengths[-4:]) // 128) * 128
    assert isinstance(collator, BucketedCollator) and collator.sizes[-1] == run.plan.tokens_per_micro_batch
    model = trainer.model.double()
    model.train()
    rows = [run.data.train[i] for i in range(4)]
    plain, padded = collator.inner(rows), collator(rows)
    assert padded[PADDING_TOKENS] > 0 and padded["input_ids"].shape[1] in collator.sizes

    def loss_and_grads(batch):
        batch = {k: v for k, v in batch.items() if k not in (PADDING_TOKENS, PADDING_ROWS)}
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss0, grads0 = loss_and_grads(plain)
    loss1, grads1 = loss_and_grads(padded)
    assert loss1.item() == pytest.approx(loss0.item(), rel=1e-12)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the useful-token and row counts of a training step skip the padding document exactly
    trainer.sftop_step_tokens = trainer.sftop_step_samples = 0
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    trainer.training_step(model, dict(padded))
    assert trainer.take_step_counts() == (plain["input_ids"].numel(), 4)
    writer.close()


def test_a_bucketed_run_counts_the_same_tokens_as_an_unbucketed_one(home, tmp_path):
    seen = {}
    for setting in ("off", "on"):
        run, writer = prepared_run(
            fast_preset(f'train.length_buckets="{setting}"', "train.max_steps=3", "train.save_steps=100"),
            tmp_path / setting,
        )
        trainer = run.build_trainer()
        assert isinstance(trainer.data_collator, BucketedCollator) == (setting == "on")
        trainer.train()
        writer.close()
        steps = of_type(events_of(run.run_dir.path), "step")
        seen[setting] = ([s["tokens_seen"] for s in steps], [s["loss"] for s in steps])
    assert seen["on"][0] == seen["off"][0] and seen["on"][0][-1] > 0
    assert seen["on"][1] == pytest.approx(seen["off"][1], rel=1e-4)


def _chat_lengths(n=2000, seed=1):
    import math
    import random

    rng = random.Random(seed)  # log-normal like chat data: median 300 tokens, capped at 2048
    return [min(2048, max(16, int(math.exp(rng.gauss(math.log(300), 0.85))))) for _ in range(n)]


def _brute_force(lengths, most, least, multiple, per_bucket=0.0):
    import itertools

    cands = sorted({-(-n // multiple) * multiple for n in lengths})
    best = (None, float("inf"))
    for k in range(1, most + 1):
        for combo in itertools.combinations(cands, k):
            if combo[-1] != cands[-1]:
                continue
            held, cost, lo = [], 0, 0
            for size in combo:
                inside = [n for n in lengths if lo < n <= size]
                held.append(len(inside))
                cost += sum(size - n for n in inside)
                lo = size
            if min(held) >= least and (best[0] is None or cost + k * per_bucket < best[1] + len(best[0]) * per_bucket):
                best = (combo, cost)
    return best


def test_fewest_padding_split_is_optimal_and_keeps_every_bucket_used():
    import random

    rng = random.Random(7)
    for trial in range(12):
        lengths = [rng.randint(1, 900) for _ in range(rng.randint(5, 40))]
        most, least = rng.randint(1, 4), rng.randint(1, 6)
        per_bucket = rng.choice([0.0, 500.0, 5000.0])
        sizes, cost = fewest_padding_split(lengths, most, least, 64, per_bucket=per_bucket)
        want, want_cost = _brute_force(lengths, most, least, 64, per_bucket)
        assert cost == want_cost and len(sizes) == len(want or ()), (trial, lengths, most, least, per_bucket)
        if want is None:
            assert sizes == ()
        else:
            assert sizes[-1] >= max(lengths) and len(sizes) <= most
            lo = 0
            for size in sizes:
                assert sum(lo < n <= size for n in lengths) >= least
                lo = size


def test_data_buckets_fit_a_long_run_and_refuse_a_short_one():
    import random

    lengths = _chat_lengths()
    sizes = data_bucket_sizes(lengths, 8, 250, seed=0)
    assert 3 <= len(sizes) <= 8 and list(sizes) == sorted(set(sizes)) and all(s % 128 == 0 for s in sizes)
    # on fresh micro-batches: bounded padding, every bucket used often enough, almost all covered
    rng = random.Random(99)
    sums = [sum(rng.sample(lengths, 8)) for _ in range(5000)]
    padded = [bucket_for(n, sizes) for n in sums]
    assert sum(padded) / sum(sums) - 1 < 0.2
    assert sum(n > sizes[-1] for n in sums) / len(sums) < 0.01
    share = [sum(p == s for p in padded) / len(sums) for s in sizes]
    assert min(share) * 250 >= 10  # at least 12 expected, with sampling noise
    # a longer run earns back more captures: as many buckets or more, and less padding per token
    longer = data_bucket_sizes(lengths, 8, 2000, seed=0)
    assert len(longer) >= len(sizes) and len(longer) == 8
    assert sum(bucket_for(n, longer) for n in sums) < sum(padded)
    # 75 micro-batches earn back only a few captures: fewer buckets, more padding; 23 not two
    short = data_bucket_sizes(lengths, 8, 75, seed=0)
    assert 1 <= len(short) < len(sizes)
    assert data_bucket_sizes(lengths, 8, 23, seed=0) == ()
    # rows all of one length pack to one length: one bucket, no padding
    assert data_bucket_sizes([300] * 100, 8, 500) == (2432,)


def test_auto_buckets_follow_the_graphs_and_say_why(home, tmp_path, monkeypatch):
    run, _ = prepared_run(fast_preset("train.max_steps=1"), tmp_path / "cpu")
    trainer = run.build_trainer()
    assert not isinstance(trainer.data_collator, BucketedCollator)
    assert run.buckets_reason == "off: packed micro-batches cannot replay CUDA graphs here"
    monkeypatch.setattr(_Run, "packed_graphs_on", lambda self: True)
    run, _ = prepared_run(fast_preset("train.max_steps=1"), tmp_path / "short")
    trainer = run.build_trainer()
    assert not isinstance(trainer.data_collator, BucketedCollator)
    assert run.buckets_reason.startswith("off: ") and "too few" in run.buckets_reason
    # the demo's rows are a few dozen tokens, so a multiple of 128 pads them heavily: allow it here
    from sftop.engine.train import buckets

    monkeypatch.setattr(buckets, "MAX_PADDING_SHARE", 1.0)
    monkeypatch.setattr(buckets, "EAGER_EXTRA_SHARE", 100.0)
    run, _ = prepared_run(fast_preset("train.max_steps=400"), tmp_path / "long")
    trainer = run.build_trainer()
    collator = trainer.data_collator
    assert isinstance(collator, BucketedCollator) and collator.sizes == (128,)
    assert run.buckets_reason.startswith(f"on: {len(collator.sizes)} lengths fitted to the data")
    assert run.started_event(400).environment["length_buckets"] == run.buckets_reason
    # fitted lengths recur: their graphs are captured at the first sighting (packed_graphs.py)
    from sftop.kernels.packed_graphs import _is_fitted_bucket, causal_lm

    lm = causal_lm(run.model)
    assert _is_fitted_bucket(lm, ("packed", 128)) and not _is_fitted_bucket(lm, ("packed", 256))


def test_the_fixed_ladder_of_buckets_waits_for_a_second_sighting(home, tmp_path, monkeypatch):
    """train.length_buckets = "on" on a run too short to fit lengths to: a fixed ladder, whose
    lengths may each come once, so none is captured before it comes again."""
    from sftop.kernels.packed_graphs import _is_fitted_bucket, causal_lm

    monkeypatch.setattr(_Run, "packed_graphs_on", lambda self: True)
    run, _ = prepared_run(fast_preset("train.max_steps=1", 'train.length_buckets="on"'), tmp_path / "on")
    trainer = run.build_trainer()
    assert isinstance(trainer.data_collator, BucketedCollator)
    assert run.buckets_reason.startswith("on (train.length_buckets = on)")
    lm = causal_lm(run.model)
    assert not any(_is_fitted_bucket(lm, ("packed", size)) for size in trainer.data_collator.sizes)


def test_a_plan_without_room_for_the_graphs_pads_to_no_buckets(home, tmp_path, monkeypatch):
    """Padding to a bucket pays only where its graph replays: a plan sized eagerly because the graphs'
    pool does not fit (Plan.graphs_refused) gets no buckets under "auto", and says why."""
    from sftop.engine.train import buckets
    from sftop.kernels import cuda_graphs as cg

    monkeypatch.setattr(_Run, "packed_graphs_on", lambda self: True)
    monkeypatch.setattr(buckets, "MAX_PADDING_SHARE", 1.0)
    monkeypatch.setattr(buckets, "EAGER_EXTRA_SHARE", 100.0)
    run, _ = prepared_run(fast_preset("train.max_steps=400"), tmp_path / "eager")
    why = "CUDA graphs off: their pool would need 0.33 GiB more than the budget"
    run.plan.graphs_refused = why
    try:
        trainer = run.build_trainer()
        assert not isinstance(trainer.data_collator, BucketedCollator)
        assert run.buckets_reason == f"off: the plan trains eagerly ({why})"
        assert cg._plan_refusal == why  # and the process captures nothing
    finally:
        cg.refuse_captures(None)


def test_the_bucket_count_spends_least_on_padding_and_captures_together():
    """Fewer buckets pad more, more buckets capture more: the count fitted is the one with the least
    of both, a capture counted as CAPTURE_COST_MICRO_BATCHES micro-batches of the mean length."""
    import math
    import random

    from sftop.engine.train import buckets

    lengths = _chat_lengths(1000)
    rng = random.Random(0)
    run = [sum(rng.sample(lengths, 8)) for _ in range(125)]  # a 1,000-row run, 8 rows a step
    sizes = fitted_bucket_sizes(run, 125, min_replays=1)
    covered = sorted(run)[: math.ceil(buckets.TOP_SHARE * len(run))]
    mean = sum(covered) / len(covered)

    def cost(k):
        found, padding = fewest_padding_split(covered, k, 1, 128)
        return padding + len(found) * buckets.CAPTURE_COST_MICRO_BATCHES * mean

    assert 1 < len(sizes) < 8
    assert cost(len(sizes)) == min(cost(k) for k in range(1, 9))
    assert cost(len(sizes)) < cost(8)  # eight buckets would pad less and cost more
    # with captures free the count is the one that pads least
    free = buckets.CAPTURE_COST_MICRO_BATCHES
    try:
        buckets.CAPTURE_COST_MICRO_BATCHES = 0
        assert len(fitted_bucket_sizes(run, 125, min_replays=1)) == 8
    finally:
        buckets.CAPTURE_COST_MICRO_BATCHES = free
