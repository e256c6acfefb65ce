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


def test_reference_forward_can_set_the_peak():
    from dataclasses import replace

    from sftop.engine.planner.estimate import ModelShape

    shape = ModelShape.from_config(llama_1b())
    setup = setup_from_preset(_dpo(), "cuda:0")
    assert setup.preference and not setup.packed
    tokens = 2 * 4 * 2048
    plain = estimate(shape, replace(setup, preference=False, checkpointing="on"), tokens, seq_len=2048)
    pref = estimate(shape, replace(setup, checkpointing="on"), tokens, seq_len=2048)
    # with checkpointing the policy keeps only block inputs; the reference forward's full block
    # activations plus the log-prob head are then above the plain loss phase
    assert pref.allocated_bytes > plain.allocated_bytes
    assert pref.peak_phase == "loss" and pref.terms["reference_forward"] > 0
    assert pref.allocated_bytes == sum(
        v for k, v in pref.terms.items() if k not in ("allocator_margin", "cuda_context")
    )
