"""CUDA graphs for packed micro-batches padded to length buckets (sftop/kernels/packed_graphs.py).

CPU: the row-boundary padding and the eligibility rules.  GPU: a patched model trained on bucketed
packed batches through captured graphs gives the losses and LoRA gradients of the same model run
eagerly on the same packed batches without the bucket padding.
"""

import pytest
import torch
from _kernel_testutil import rel_err
from _tiny_models import tiny_model, twin
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import sftop.kernels as K
from sftop.engine.train.buckets import PADDING_ROWS, PADDING_TOKENS, BucketedCollator
from sftop.kernels import cuda_graphs as cg
from sftop.kernels.packed_graphs import (
    _PACKED_GRAPHS,
    causal_lm,
    expect_length_buckets,
    graphs_summary,
    packed_graph_stats,
    packed_graphed_loss,
    padded_boundaries,
    release_graphs,
)
from sftop.kernels.patching import markers as M

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_row_boundaries_are_padded_with_empty_rows():
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    assert padded_boundaries(cu).tolist() == [0, 3, 5, 8, 8, 8, 8, 8]
    assert padded_boundaries(torch.arange(8)).tolist() == list(range(8))
    assert padded_boundaries(torch.arange(9), multiple=4).tolist() == list(range(9)) + [8, 8, 8]


def test_a_runs_graph_summary_adds_up_every_graph_set_once():
    m = tiny_model("llama")
    assert graphs_summary(m) is None  # nothing patched: no graphs
    lm = causal_lm(m)
    fixed, packed = cg.StepGraphs(), cg.StepGraphs()
    lm.__dict__[M.GRAPHS] = fixed
    assert graphs_summary(m) is None  # patched, but no call reached the graphs
    lm.__dict__[_PACKED_GRAPHS] = packed
    tower = lm.model.layers[0]
    tower.__dict__[M.TOWER_GRAPHS] = packed  # the same set reached twice counts once
    fixed.stats.eager_calls, fixed.stats.captures, fixed.stats.replays = 2, 1, 30
    fixed.stats.capture_seconds.update(warm_up=0.25, clean_up=0.125, forward=0.5, backward=0.75)
    packed.stats.eager_calls, packed.stats.captures, packed.stats.replays = 5, 3, 40
    packed.stats.failures.append("no room")
    packed.stats.capture_seconds.update(warm_up=1.0, forward=0.5)
    summary = graphs_summary(m)
    assert summary == {
        "captures": 4,
        "replays": 70,
        "eager_calls": 7,
        "failures": ["no room"],
        "capture_s": 3.125,
        "capture_s_by_phase": {"warm_up": 1.25, "clean_up": 0.125, "forward": 1.0, "backward": 0.75},
    }
    release_graphs(m)  # dropping the graphs keeps what they did: a step-down's run still reports it
    assert graphs_summary(m)["captures"] == 4


def test_capture_phases_add_up_their_wall_time_even_when_they_fail(monkeypatch):
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    monkeypatch.setattr(cg.time, "perf_counter", lambda: next(ticks))
    stats = cg.GraphStats()
    with stats.timed("warm_up"):
        pass
    with pytest.raises(RuntimeError), stats.timed("warm_up"):
        raise RuntimeError("capture failed")
    assert stats.capture_seconds == {"warm_up": 0.75, "clean_up": 0.0, "forward": 0.0, "backward": 0.0}


def test_a_cpu_model_always_runs_eagerly():
    m = tiny_model("llama")
    m.train()
    ids = torch.randint(3, 100, (1, 12))
    batch = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": torch.arange(12)[None],
        "cu_seq_lens_q": torch.tensor([0, 12], dtype=torch.int32),
    }
    assert packed_graphed_loss(m, batch) is None
    assert packed_graph_stats(m) is None


def _packed_batches(n, sizes=(128, 192, 256), seed=1):
    """n packed micro-batches of 4 rows of 10-60 tokens, padded to buckets, on the GPU; and the same
    batches without the padding."""
    gen = torch.Generator().manual_seed(seed)
    inner = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    collator = BucketedCollator(inner, sizes, pad_token_id=0)
    out = []
    for _ in range(n):
        rows = []
        for _row in range(4):
            length = int(torch.randint(10, 60, (1,), generator=gen))
            ids = torch.randint(3, 301, (length,), generator=gen).tolist()
            rows.append({"input_ids": ids, "labels": ids})
        pair = []
        for batch in (collator(rows), inner(rows)):
            batch = {
                k: (v.cuda() if torch.is_tensor(v) else v)
                for k, v in batch.items()
                if k not in (PADDING_TOKENS, PADDING_ROWS, "seq_idx")
            }
            pair.append(batch)
        out.append(tuple(pair))
    return out


def _losses_and_grads(model, batches, graphed):
    """Each batch's loss and LoRA gradients at the initial weights (no optimizer steps: attention's
    backward is not bitwise deterministic, and Adam would amplify that into different weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses, grads = [], []
    for padded, plain in batches:
        batch = padded if graphed else plain
        model.zero_grad(set_to_none=True)
        loss = packed_graphed_loss(model, batch) if graphed else None
        if loss is None:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.float().clone() for p in params])
    return losses, grads


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fitted", [False, True], ids=["second-sighting", "fitted-first-sighting"])
def test_bucketed_graphs_match_eager_on_packed_batches(monkeypatch, fitted):
    """Buckets fitted to the data (`expect_length_buckets`) are captured at their first sighting,
    the model's very first step included: nothing runs eagerly before its capture's warm-ups."""
    graphed = tiny_model("llama", dtype=torch.bfloat16)
    eager = twin(graphed)
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    K.patch_model(eager)
    monkeypatch.delenv(cg.ENV_SWITCH)
    report = K.patch_model(graphed)
    if report.parts.get("attention") != "fused":
        pytest.skip(f"packed attention unavailable here: {report.parts.get('attention')}")
    assert report.parts["cuda_graphs"] == "fused", report.parts
    batches = _packed_batches(10)
    if fitted:
        expect_length_buckets(graphed, (128, 192, 256))
    ref = _losses_and_grads(eager, batches, graphed=False)
    got = _losses_and_grads(graphed, batches, graphed=True)
    stats = packed_graph_stats(graphed)
    assert stats.captures >= 1 and stats.replays >= 1 and not stats.failures, stats
    assert stats.eager_calls + stats.replays == len(batches)
    assert (stats.eager_calls == 0) == fitted, stats
    # every phase of a training capture took host time, and the run's summary counts it
    assert all(stats.capture_seconds[phase] > 0 for phase in cg.CAPTURE_PHASES), stats.capture_seconds
    summary = graphs_summary(graphed)
    assert (summary["captures"], summary["replays"]) == (stats.captures, stats.replays)
    assert summary["capture_s"] == pytest.approx(sum(stats.capture_seconds.values()), abs=5e-3)
    (l_e, g_e), (l_g, g_g) = ref, got
    for a, b in zip(l_e, l_g):
        assert abs(a - b) <= 2e-2 * abs(a), (l_e, l_g)
    for step_e, step_g in zip(g_e, g_g):
        for a, b in zip(step_e, step_g):
            assert a.abs().sum() > 0
            assert rel_err(b, a) < 2e-2
