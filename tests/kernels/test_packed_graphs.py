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
from sftop.kernels.packed_graphs import packed_graph_stats, packed_graphed_loss, padded_boundaries

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_row_boundaries_are_padded_with_empty_rows():
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    assert padded_boundaries(cu).tolist() == [0, 3, 5, 8, 8, 8, 8, 8]
    assert padded_boundaries(torch.arange(8)).tolist() == list(range(8))
    assert padded_boundaries(torch.arange(9), multiple=4).tolist() == list(range(9)) + [8, 8, 8]


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
def test_bucketed_graphs_match_eager_on_packed_batches(monkeypatch):
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
    ref = _losses_and_grads(eager, batches, graphed=False)
    got = _losses_and_grads(graphed, batches, graphed=True)
    stats = packed_graph_stats(graphed)
    assert stats.captures >= 1 and stats.replays >= 1 and not stats.failures, stats
    assert stats.eager_calls + stats.replays == len(batches)
    (l_e, g_e), (l_g, g_g) = ref, got
    for a, b in zip(l_e, l_g):
        assert abs(a - b) <= 2e-2 * abs(a), (l_e, l_g)
    for step_e, step_g in zip(g_e, g_g):
        for a, b in zip(step_e, step_g):
            assert a.abs().sum() > 0
            assert rel_err(b, a) < 2e-2
