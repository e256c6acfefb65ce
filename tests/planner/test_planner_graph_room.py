"""Packed SFT plans count CUDA graphs' pool, shrink the loss's logits chunk to make room for it, and
fall back to an eager (host-bound, slower) step where even that does not fit (planner/solve.py)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from _shapes import llama_1b, one_gpu, preset

from sftop.engine.gpu import GIB
from sftop.engine.planner import plan_run
from sftop.engine.planner.estimate import ModelShape, estimate
from sftop.engine.planner.solve import (
    EAGER_HOST_S_PER_LAYER_PASS,
    _candidate,
    _sized,
    setup_from_preset,
    size_for_data,
)
from sftop.kernels.constants import FUSED_CE_CHUNK_BYTES, SMALL_FUSED_CE_CHUNK_BYTES


@pytest.fixture
def packed_attention(monkeypatch):
    import sftop.kernels.varlen_attention as va

    # the CPU here has no flash attention; pretend a capable GPU is present
    monkeypatch.setattr(va, "varlen_available", lambda: (True, ""))


def chat_lengths(rows: int = 2000, seed: int = 0) -> list[int]:
    """Log-normal row lengths, median ~300, capped at 2,048 (benchmarks/whole_run.py's kind of data)."""
    rng = random.Random(seed)
    return [min(2048, max(16, int(math.exp(rng.gauss(math.log(300), 0.8))))) for _ in range(rows)]


def planned(cap_gib: float | None):
    keys = {} if cap_gib is None else {"max_memory_gib": cap_gib}
    plan = plan_run(preset(effective_batch=8, **keys), llama_1b(), gpus=one_gpu(80))
    return size_for_data(plan, chat_lengths(), 128)


def _dynamic(est) -> int:
    static = ("weights", "lora_params", "lora_grads", "optimizer_states", "cublas_workspace")
    return est.allocated_bytes - sum(est.terms.get(k, 0) for k in static)


def test_the_pool_holds_one_eager_steps_dynamic_memory_and_one_set_of_gradients():
    shape = ModelShape.from_config(llama_1b().to_dict())
    setup = replace(setup_from_preset(preset(), "cuda:0"), attention="varlen", checkpointing="on")
    assert setup.cuda_graphs and setup.packed
    eager = estimate(shape, replace(setup, cuda_graphs=False), 3712, seq_len=2048)
    graphed = estimate(shape, setup, 3712, seq_len=2048)
    # one step's dynamic memory, and the one set of LoRA gradient buffers the captured buckets share
    pool = _dynamic(eager) + eager.terms["lora_grads"]
    assert graphed.terms["graph_pool"] == pool and _dynamic(eager) > 0
    assert graphed.allocated_bytes == eager.allocated_bytes + pool
    # no graphs: SDPA's masked packing (packed_graphs needs sftop's packed attention), dropout, the CPU
    assert "graph_pool" not in estimate(shape, replace(setup, attention="sdpa"), 3712, seq_len=2048).terms
    assert "graph_pool" not in estimate(shape, replace(setup, lora_dropout=0.05), 3712, seq_len=2048).terms
    assert not setup_from_preset(preset(), "cpu").cuda_graphs
    # the smaller logits chunk takes exactly the chunk difference off the loss's peak, eager or graphed
    small = estimate(shape, replace(setup, cuda_graphs=False, loss_chunk_bytes=SMALL_FUSED_CE_CHUNK_BYTES), 3712)
    assert small.allocated_bytes < eager.allocated_bytes


def test_with_memory_to_spare_every_packed_candidate_replays_graphs_at_the_default_chunk(packed_attention):
    plan = planned(None)
    assert plan.loss_chunk_mib is None and plan.breakdown["graph_pool"] > 0
    assert all(c["cuda_graphs"] and c["loss_chunk_mib"] == FUSED_CE_CHUNK_BYTES >> 20 for c in plan.candidates)


def test_a_tight_cap_takes_smaller_loss_chunks_so_the_graphs_fit(packed_attention):
    plan = planned(3.8)
    assert plan.predicted_peak_gib <= 3.8
    assert plan.loss_chunk_mib == SMALL_FUSED_CE_CHUNK_BYTES >> 20 and plan.breakdown["graph_pool"] > 0
    assert any("64 MiB chunks (not 256)" in n for n in plan.notes)
    chosen = next(
        c
        for c in plan.candidates
        if (c["micro_batch"], c["gradient_checkpointing"]) == (plan.micro_batch, plan.gradient_checkpointing)
    )
    assert chosen["cuda_graphs"] and chosen["fits"] and chosen["relative_step_time"] == 1.0
    # the same candidate at the default chunk would not have fitted with its pool
    ctx = plan.context
    setup = replace(ctx.setup, checkpointing=plan.gradient_checkpointing)
    assert setup.loss_chunk_bytes == FUSED_CE_CHUNK_BYTES
    default = _sized(ctx, setup, plan.tokens_per_micro_batch, plan.micro_batch)
    small = _sized(
        ctx, replace(setup, loss_chunk_bytes=SMALL_FUSED_CE_CHUNK_BYTES), plan.tokens_per_micro_batch, plan.micro_batch
    )
    assert "graph_pool" in default[0].terms and default[2] > ctx.budget_bytes >= small[2]


def test_where_no_pool_fits_the_plan_trains_eagerly_and_is_timed_as_host_bound(packed_attention):
    plan = planned(3.4)
    assert plan.predicted_peak_gib <= 3.4 and "graph_pool" not in plan.breakdown
    assert any("CUDA graphs off" in n and "trains eagerly" in n for n in plan.notes)
    assert not any(c["cuda_graphs"] for c in plan.candidates if c["fits"])
    # the plan says so to the trainer, which then captures nothing (test_the_trainer_takes_...)
    assert plan.graphs_refused is not None and plan.graphs_refused in plan.notes
    assert plan.to_dict()["graphs_refused"] == plan.graphs_refused
    assert planned(4.3).graphs_refused is None  # graphs that fit
    layers = ModelShape.from_config(llama_1b().to_dict()).layers
    passes = 3  # forward, recomputation, backward: offloaded checkpointing recomputes every block
    assert plan.modelled_step_s >= EAGER_HOST_S_PER_LAYER_PASS * layers * passes * plan.grad_accum - 1e-9
    # the eager candidate is slower than the same one replaying graphs with memory to spare
    ctx = plan.context
    roomy = _candidate(replace(ctx, budget_bytes=80 * GIB), plan.gradient_checkpointing, plan.micro_batch)
    eager = _candidate(ctx, plan.gradient_checkpointing, plan.micro_batch)
    assert roomy.graphs and not eager.graphs and eager.time_s > 2 * roomy.time_s


def test_a_cap_prefers_a_smaller_graphed_micro_batch_to_a_bigger_eager_one(packed_attention):
    # at 4.3 GiB four-row micro-batches fit only eagerly; the planner takes fewer rows with graphs
    plan = planned(4.3)
    assert plan.breakdown["graph_pool"] > 0
    eager_bigger = [
        c for c in plan.candidates if c["fits"] and not c["cuda_graphs"] and c["micro_batch"] > plan.micro_batch
    ]
    assert eager_bigger, "the cap should leave a bigger micro-batch that fits only without graphs"
    assert all(c["relative_step_time"] > 1.0 for c in eager_bigger)


def test_the_trainer_takes_the_plans_loss_chunk():
    from types import SimpleNamespace

    from sftop.engine.train.runner import _Run
    from sftop.kernels import fused_linear_cross_entropy as flce

    vocab = 128256
    try:
        _Run.apply_plan_to_kernels(SimpleNamespace(plan=SimpleNamespace(loss_chunk_mib=64)))
        assert flce.chunk_rows(8192, vocab, 2) == (64 << 20) // (vocab * 2)
        _Run.apply_plan_to_kernels(SimpleNamespace(plan=SimpleNamespace(loss_chunk_mib=None)))
        assert flce.chunk_rows(8192, vocab, 2) == FUSED_CE_CHUNK_BYTES // (vocab * 2)
    finally:
        flce.set_chunk_bytes(None)


def test_the_trainer_captures_nothing_where_the_plan_has_no_room_for_the_pool(monkeypatch):
    """A plan sized eagerly because the graphs' pool does not fit (Plan.graphs_refused) turns every
    capture of the process off, whatever the capture-time room check would say; the next plan that
    has room turns them back on."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernels"))
    from _rerun_steps import rerun_captures

    from sftop.engine.train.runner import _Run
    from sftop.kernels import cuda_graphs as cg
    from sftop.kernels import fused_linear_cross_entropy as flce

    made = rerun_captures(monkeypatch)  # the room check always says yes here
    weight = torch.nn.Parameter(torch.ones(3))
    slots = [(None, "w", weight)]
    x = torch.ones(3)
    why = "CUDA graphs off: their pool would need 0.33 GiB more than the budget"
    try:
        _Run.apply_plan_to_kernels(SimpleNamespace(plan=SimpleNamespace(loss_chunk_mib=None, graphs_refused=why)))
        graphs = cg.StepGraphs()
        for _ in range(3):
            assert graphs.replay("k", lambda t: (t * weight).sum(), (x,), slots) is None
        assert made == [] and graphs.stats.captures == 0 and graphs.stats.failures == [why]
        _Run.apply_plan_to_kernels(SimpleNamespace(plan=SimpleNamespace(loss_chunk_mib=None, graphs_refused=None)))
        fresh = cg.StepGraphs()
        for _ in range(2):
            fresh.replay("k", lambda t: (t * weight).sum(), (x,), slots)
        assert fresh.stats.captures == 1
    finally:
        cg.refuse_captures(None)
        flce.set_chunk_bytes(None)
