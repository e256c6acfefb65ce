"""The planner sizes DPO runs: a row is a pair (chosen + rejected in one forward, twice the tokens),
padded rather than packed, with a reference forward that holds no gradients."""

from _shapes import llama_1b, one_gpu, preset

from sftop.engine.planner import plan_run
from sftop.engine.planner.estimate import estimate
from sftop.engine.planner.solve import setup_from_preset


def _dpo(**kw):
    p = preset(**kw)
    return p.model_copy(update={"train": p.train.model_copy(update={"task": "dpo"})})


def test_dpo_plans_twice_the_tokens_and_no_packing():
    for size in (16, 24, 80):
        sft = plan_run(preset(max_length=1024), llama_1b(), gpus=one_gpu(size))
        dpo = plan_run(_dpo(max_length=1024), llama_1b(), gpus=one_gpu(size))
        assert dpo.micro_batch * dpo.grad_accum == 16
        assert dpo.tokens_per_micro_batch == 2 * dpo.micro_batch * 1024
        assert not dpo.packing and sft.packing
        assert dpo.predicted_peak_gib <= dpo.budget_gib
        # each row costs twice the tokens, so never a larger micro-batch than SFT at the same setting
        assert dpo.micro_batch <= sft.micro_batch or dpo.gradient_checkpointing != sft.gradient_checkpointing


STATIC = ("weights", "lora_params", "lora_grads", "optimizer_states", "cublas_workspace")


def _dynamic(est) -> int:
    return est.allocated_bytes - sum(est.terms.get(k, 0) for k in STATIC)


def test_reference_forward_runs_first_and_the_graphs_pool_is_counted_where_they_engage(monkeypatch):
    from dataclasses import replace

    from sftop.engine.planner.estimate import ModelShape

    shape = ModelShape.from_config(llama_1b())
    setup = setup_from_preset(_dpo(), "cuda:0")
    assert setup.preference and setup.cuda_graphs and not setup.packed
    tokens = 2 * 4 * 2048
    for checkpointing in ("on", "off"):
        plain = estimate(
            shape,
            replace(setup, preference=False, cuda_graphs=False, checkpointing=checkpointing),
            tokens,
            seq_len=2048,
        )
        eager = estimate(shape, replace(setup, cuda_graphs=False, checkpointing=checkpointing), tokens, seq_len=2048)
        # the reference forward runs before the policy's (sftop's DPO trainer): its block and head
        # never stack on the policy's saved tensors, so the policy step sets the peak
        assert eager.allocated_bytes == plain.allocated_bytes and "reference_forward" not in eager.terms
        graphed = estimate(shape, replace(setup, checkpointing=checkpointing), tokens, seq_len=2048)
        # the graphs' pool keeps one step's dynamic memory, beside which another length runs eagerly,
        # and the captured steps' shared gradients stay beside that step's own
        pool = _dynamic(eager) + eager.terms["lora_grads"]
        assert graphed.terms["graph_pool"] == pool and _dynamic(eager) > 0
        assert graphed.allocated_bytes == eager.allocated_bytes + pool
        assert graphed.allocated_bytes == sum(
            v for k, v in graphed.terms.items() if k not in ("allocator_margin", "cuda_context")
        )
        assert any("CUDA graphs keep" in n for n in graphed.notes)
    # the graphs pad lengths to a multiple of 256: a 1,000-token limit keeps 1,024-token transients
    padded = estimate(shape, replace(setup, cuda_graphs=False, checkpointing="on"), 2 * 4 * 1024, seq_len=1024)
    short = estimate(shape, replace(setup, checkpointing="on"), 2 * 4 * 1000, seq_len=1000, rows=8)
    assert short.terms["graph_pool"] == _dynamic(padded) + padded.terms["lora_grads"]
    # offloaded checkpointing (sftop's overlapped copies) is captured too: its pool is counted
    offloaded = estimate(shape, replace(setup, cuda_graphs=False, checkpointing="offload"), tokens, seq_len=2048)
    graphed = estimate(shape, replace(setup, checkpointing="offload"), tokens, seq_len=2048)
    assert graphed.terms["graph_pool"] == _dynamic(offloaded) + offloaded.terms["lora_grads"]
    # where the graphs stay off, nothing is added
    assert not setup_from_preset(_dpo(), "cpu").cuda_graphs
    # SFT: the packed bucket graphs (test_planner_cap.py sizes them), never unpacked rows
    assert setup_from_preset(preset(packing=True), "cuda:0").cuda_graphs
    assert not setup_from_preset(preset(packing=False), "cuda:0").cuda_graphs
    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")
    assert not setup_from_preset(_dpo(), "cuda:0").cuda_graphs


def test_a_dpo_plan_leaves_room_for_the_graphs_pool(monkeypatch):
    with_graphs = plan_run(_dpo(max_length=1024), llama_1b(), gpus=one_gpu(16))
    assert with_graphs.predicted_peak_gib <= with_graphs.budget_gib
    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")
    without = plan_run(_dpo(max_length=1024), llama_1b(), gpus=one_gpu(16))
    assert without.predicted_peak_gib <= without.budget_gib
    # the same run costs more memory with the pool: a smaller micro-batch, checkpointing, or a higher peak
    assert (
        with_graphs.micro_batch < without.micro_batch
        or with_graphs.gradient_checkpointing != without.gradient_checkpointing
        or with_graphs.predicted_peak_gib > without.predicted_peak_gib
    )
