"""Token-balanced micro-batches in the trainer: a step split by tokens trains exactly as the same
rows in one packed micro-batch, resumes on the same rows, and keeps the effective batch."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftop.engine.models.demo import demo_dir
from sftop.engine.planner.token_split import (
    largest_micro_batch,
    micro_batch_tokens,
    split_bounds,
    split_step,
    step_batches,
)
from sftop.engine.train.buckets import fitted_bucket_sizes
from sftop.engine.train.token_batches import TokenBalancedSampler


def test_sampler_yields_each_step_split_and_resumes_through_accelerate():
    from accelerate import Accelerator, skip_first_batches
    from torch.utils.data import DataLoader

    lengths = [(i * 37) % 300 + 5 for i in range(43)]
    sampler = TokenBalancedSampler(lengths, rows_per_step=8, micro_batches=2, seed=5)
    assert len(sampler) == 5 * 2 + 2  # five full steps, then 3 rows in 2 micro-batches
    sampler.set_epoch(1)
    expected = [g for step in step_batches(lengths, 8, 2, 5, 1) for g in step]
    assert list(sampler) == expected

    loader = Accelerator(cpu=True).prepare(DataLoader(list(range(43)), batch_sampler=sampler, collate_fn=list))
    loader.set_epoch(1)
    assert list(loader) == expected
    # what transformers' Trainer does on resume: skip the micro-batches already trained, then set the epoch
    resumed = skip_first_batches(loader, 6)
    resumed.set_epoch(1)
    inner = getattr(getattr(resumed, "batch_sampler", None), "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(1)
    assert list(resumed) == expected[6:]
    with pytest.raises(ValueError, match="micro_batches"):
        TokenBalancedSampler(lengths, rows_per_step=2, micro_batches=3, seed=0)


def _chat_lengths(n, seed=42):
    """Log-normal row lengths, median 300 tokens, clipped to 1..2,048 (as the planner tests draw them)."""
    import math
    import random

    rng = random.Random(seed)
    sigma = math.sqrt(2 * math.log(420 / 300))
    return [int(min(2048, max(1, round(rng.lognormvariate(math.log(300), sigma))))) for _ in range(n)]


@pytest.mark.parametrize("parts", [1, 2])
def test_the_sampler_serves_the_micro_batches_the_planner_sized_with_equal_token_steps(parts):
    """The trainer's micro-batches are those the planner sized for and the buckets were fitted to:
    the same tokens in the same order, over two epochs, with a partial last step."""
    lengths = _chat_lengths(1003)
    sampler = TokenBalancedSampler(lengths, rows_per_step=8, micro_batches=parts, seed=11, balanced=True)
    served = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 125 * parts + min(3, parts)
        assert sorted(i for b in batches for i in b) == list(range(1003))
        served += [sum(lengths[i] for i in b) for b in batches]
    assert served == micro_batch_tokens(lengths, 8, parts, 11, 2, balanced=True)
    assert largest_micro_batch(lengths, 8, parts, 11, 2, balanced=True) == max(served)
    assert split_bounds(lengths, 8, 11, 2, balanced=True)[8 // parts - 1] == max(served)
    assert split_bounds(lengths, 8, 11, 2, multiple=128, balanced=True)[8 // parts - 1] == -(-max(served) // 128) * 128
    # the composition is the one the flag asks for
    unbalanced = TokenBalancedSampler(lengths, rows_per_step=8, micro_batches=parts, seed=11, balanced=False)
    assert [sum(lengths[i] for i in b) for b in unbalanced] == micro_batch_tokens(lengths, 8, parts, 11, 1, False)
    assert max(served) < largest_micro_batch(lengths, 8, parts, 11, 2, balanced=False)


def test_the_runs_sampler_and_plan_follow_train_equal_token_steps(home, tmp_path, monkeypatch):
    """The preset key reaches both sides: the plan is sized for the steps the sampler will serve,
    "off" serves consecutive rows of the seeded order, and the bucket reason says which."""
    from sftop.engine.planner.token_split import epoch_order
    from sftop.engine.train import buckets
    from sftop.engine.train.runner import _Run
    from train_helpers import fast_preset, prepared_run

    monkeypatch.setattr(_Run, "packed_graphs_on", lambda self: True)
    monkeypatch.setattr(buckets, "MAX_PADDING_SHARE", 1.0)  # the demo's rows are far shorter than a bucket
    monkeypatch.setattr(buckets, "EAGER_EXTRA_SHARE", 100.0)
    for setting, balanced in (("on", True), ("off", False)):
        preset = fast_preset(
            "train.max_steps=400",
            "data.packing=true",
            f'train.equal_token_steps="{setting}"',
            "train.effective_batch=4",
        )
        run, writer = prepared_run(preset, tmp_path / setting)
        try:
            run.size_plan_for_data()
            assert run.plan.split_by == "tokens"
            trainer = run.build_trainer()
            sampler = trainer.sftop_token_sampler
            assert isinstance(sampler, TokenBalancedSampler) and sampler.balanced is balanced
            lengths, parts, seed = run.train_lengths, run.plan.grad_accum, preset.train.seed
            served = list(sampler)
            assert served == [g for s in step_batches(lengths, 4, parts, seed, 0, balanced) for g in s]
            assert run.plan.tokens_per_micro_batch >= max(sum(lengths[i] for i in g) for g in served)
            steps = [sorted(i for g in served[k : k + parts] for i in g) for k in range(0, len(served), parts)]
            order = epoch_order(len(lengths), seed, 0)
            consecutive = [sorted(order[k : k + 4]) for k in range(0, len(order), 4)]
            assert (steps == consecutive) is not balanced
            assert run.buckets_reason.startswith("on: ")
            assert run.buckets_reason.endswith(" of equal-token steps") is balanced
        finally:
            writer.close()


def _padding_share(run, sizes):
    """Padding tokens over trained tokens where each micro-batch is padded up to its bucket (those
    above the largest bucket run unpadded)."""
    return sum(next(s for s in sizes if s >= n) - n for n in run if n <= sizes[-1]) / sum(run)


def test_equal_token_steps_need_fewer_buckets_and_less_padding():
    """Why train.equal_token_steps exists: 1,000 chat rows, 8 a step (125 steps). Random steps'
    micro-batches need 4 buckets (one micro-batch a step) or 5 (two) and still pad 17 % / 14 %;
    equal-token steps need 1 or 3 and pad about 4 %."""
    lengths = _chat_lengths(1000)
    found = {}
    for balanced in (False, True):
        for parts in (1, 2):
            run = micro_batch_tokens(lengths, 8, parts, 42, 1, balanced)
            sizes = fitted_bucket_sizes(run, len(run))
            found[balanced, parts] = (sizes, round(_padding_share(run, sizes), 3))
    assert found[False, 1] == ((2688, 3584, 4608, 6912), 0.170)
    assert found[False, 2] == ((1408, 1792, 2176, 2560, 3456), 0.140)
    assert found[True, 1] == ((3456,), 0.042)
    assert found[True, 2] == ((1664, 1792, 2048), 0.044)


def test_split_step_loss_and_lora_gradients_equal_one_packed_micro_batch(home):
    """float32, tiny model: the sum of the micro-batch losses (each over the step's label tokens)
    and the accumulated LoRA gradients equal those of the whole step packed at once (rel 1e-5 of
    each gradient's largest entry)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_dir(), attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (23, 5, 17, 9, 30, 12, 7, 14):
        ids = torch.randint(3, 500, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    step_items = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    lora = [p for p in model.parameters() if p.requires_grad]

    def run(groups):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for group in groups:
            batch = collate([rows[i] for i in group])
            loss = model(**batch, use_cache=False, num_items_in_batch=step_items).loss
            loss.backward()
            total += loss.item()
        return total, [p.grad.detach().clone() for p in lora]

    whole_loss, whole_grads = run([list(range(8))])
    groups = split_step([len(r["input_ids"]) for r in rows], 3)
    assert len(groups) == 3
    split_loss, split_grads = run(groups)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(split_grads, whole_grads):
        # float32 sums in another order: a gradient's near-zero entries differ by rounding of its
        # largest ones, so the absolute tolerance scales with them
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.slow
def test_run_split_by_tokens_trains_as_one_packed_micro_batch(home, tmp_path, monkeypatch):
    """`sftop run`: 4 rows per step in 2 token-balanced micro-batches give the losses and gradient
    norms of the same 4 rows in one micro-batch, and every step trains 4 rows."""
    from sftop.engine.train.runner import run_training
    from train_helpers import events_of, fast_preset, of_type

    served: list[list[int]] = []
    plain_iter = TokenBalancedSampler.__iter__

    def spy(self):
        for batch in plain_iter(self):
            served.append(batch)
            yield batch

    monkeypatch.setattr(TokenBalancedSampler, "__iter__", spy)
    runs = {}
    for micro in (4, 2):
        served.clear()
        run_dir = tmp_path / str(micro)
        preset = fast_preset(
            "train.max_steps=3",
            "train.save_steps=100",
            "data.packing=true",
            f"plan.micro_batch={micro}",
            f"plan.grad_accum={4 // micro}",
            'plan.split_by="tokens"',
        )
        assert run_training(preset, run_dir) == 0
        records = events_of(run_dir)
        plan = of_type(records, "run_started")[0]["plan"]
        assert (plan["split_by"], plan["grad_accum"]) == ("tokens", 4 // micro)
        runs[micro] = of_type(records, "step")
        # the run's micro-batches came from the token-balanced sampler: 4 rows per step, in 4 // micro groups
        steps = [served[i : i + 4 // micro] for i in range(0, 3 * (4 // micro), 4 // micro)]
        assert [sum(len(g) for g in s) for s in steps] == [4, 4, 4]
    whole, split = runs[4], runs[2]
    assert len(whole) == len(split) == 3
    assert [s["tokens_seen"] for s in split] == [s["tokens_seen"] for s in whole]
    for a, b in zip(split, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_a_resume_keeps_the_composition_of_steps(home, tmp_path):
    """train.equal_token_steps decides which rows each step holds: a resume cannot change it, and a
    run recorded before the key existed (it trained consecutive rows) resumes with "off"."""
    import tomli_w

    from sftop.engine.errors import PresetError
    from sftop.engine.events import EventWriter
    from sftop.engine.presets import load_preset
    from sftop.engine.rundir import RunDir
    from sftop.engine.train.resume_check import check_resume, incompatible_changes
    from sftop.engine.train.runner import _Run

    on, off = {"train": {"equal_token_steps": "on"}}, {"train": {"equal_token_steps": "off"}}
    assert incompatible_changes(on, off) == ["`train.equal_token_steps` 'on' -> 'off'"]
    assert incompatible_changes(off, on) == ["`train.equal_token_steps` 'off' -> 'on'"]
    assert incompatible_changes(on, on) == incompatible_changes(off, off) == []

    preset, _ = load_preset("demo")
    recorded = preset.model_dump(mode="json", exclude_none=True)
    run = RunDir(tmp_path / "newer").create()
    run.preset.write_text(tomli_w.dumps(recorded), encoding="utf-8")
    with pytest.raises(PresetError, match="equal_token_steps"):
        check_resume(run, load_preset("demo", ['train.equal_token_steps="off"'])[0])

    del recorded["train"]["equal_token_steps"]
    run = RunDir(tmp_path / "older").create()
    run.preset.write_text(tomli_w.dumps(recorded), encoding="utf-8")
    check_resume(run, preset)  # not refused: the resume keeps what the run trained with
    with EventWriter(run.events) as writer:
        resumed = _Run(preset, run, writer, resume=True).keep_predated_keys(preset)
        assert resumed.train.equal_token_steps == "off"
        fresh = RunDir(tmp_path / "fresh").create()
        assert _Run(preset, fresh, writer, resume=False).keep_predated_keys(preset) is preset
    from train_helpers import events_of, of_type

    said = [m["text"] for m in of_type(events_of(run.path), "message")]
    assert said == ['Resuming a run recorded before these keys existed, as it trained: train.equal_token_steps = "off"']
