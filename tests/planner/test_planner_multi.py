"""plan.gpus: which GPUs a run takes, the strategy, and the per-process batch that keeps the effective batch."""

from __future__ import annotations

import pytest
from _fake_nvml import FakeNvml, gpu
from _shapes import llama_1b, llama_8b, preset

from sftop.engine.errors import PresetError, ResourceError
from sftop.engine.gpu import GpuStatus, read_gpus
from sftop.engine.gpu_select import rank_info, select_gpus, selection_in_rank
from sftop.engine.planner import render_plan
from sftop.engine.planner.multi import per_rank_batch, plan_selection, refuse_unbuilt
from sftop.engine.presets import Preset


def gpus(*specs):
    return read_gpus(FakeNvml([gpu(i, total, used=used) for i, (total, used) in enumerate(specs)]), env={})


def plan_section(**kw):
    return Preset.model_validate({"plan": kw}).plan


def test_schema_accepts_auto_count_and_list_and_rejects_nonsense():
    assert plan_section().gpus == "auto" and plan_section().device == "auto"
    assert plan_section(gpus=2).gpus == 2
    assert plan_section(gpus=[0, 3]).gpus == [0, 3]
    for bad in (0, [], [1, 1], [-1]):
        with pytest.raises(ValueError):
            plan_section(gpus=bad)


def test_auto_takes_every_free_gpu_and_says_why_a_busy_one_is_left_out():
    sel = select_gpus(plan_section(), gpus((80, 0.5), (80, 30.0), (80, 0.4)))
    assert sel.world_size == 2 and sel.device == "cuda" and sel.backend == "nccl"
    assert [g.index for g in sel.gpus] == [0, 2]
    assert sel.left_out == ["cuda:1 (NVIDIA Test 80GB): in use by another process (30.0 GiB used)"]


def test_count_takes_the_gpus_with_most_free_memory_and_refuses_too_many():
    sel = select_gpus(plan_section(gpus=2), gpus((24, 0.5), (80, 0.5), (48, 0.5)))
    assert [g.index for g in sel.gpus] == [1, 2]
    assert "cuda:0" in sel.left_out[0]
    with pytest.raises(PresetError) as err:
        select_gpus(plan_section(gpus=3), gpus((80, 0.5), (80, 20.0), (80, 0.5)))
    assert "only 2 of the 3" in str(err.value) and "plan.gpus = 2" in str(err.value)


def test_list_keeps_a_named_busy_gpu_with_a_note_and_refuses_missing_indices():
    sel = select_gpus(plan_section(gpus=[1]), gpus((80, 0.5), (80, 20.0)))
    assert sel.world_size == 1 and sel.gpus[0].index == 1 and "kept because plan.gpus names it" in sel.notes[0]
    with pytest.raises(PresetError, match="no usable GPU with index 5"):
        select_gpus(plan_section(gpus=[0, 5]), gpus((80, 0.5), (80, 0.5)))


def test_cpu_machine_is_one_process_unless_cpu_processes_are_asked_for():
    none = GpuStatus(reason="no driver")
    assert select_gpus(plan_section(), none).world_size == 1
    with pytest.raises(PresetError, match='plan.device = "cpu"'):
        select_gpus(plan_section(gpus=2), none)
    sel = select_gpus(plan_section(gpus=2, device="cpu"), none)
    assert (sel.world_size, sel.device, sel.backend) == (2, "cpu", "gloo")
    with pytest.raises(PresetError):
        select_gpus(plan_section(gpus=[0], device="cpu"), none)


def test_effective_batch_split_exactly_or_refused_with_what_works():
    assert per_rank_batch(16, 4) == 4
    with pytest.raises(PresetError) as err:
        per_rank_batch(6, 4)
    assert "multiple of 4" in err.value.hint and "plan.gpus to 3 or 2" in err.value.hint


def test_ddp_plan_per_process_batch_and_each_gpus_peak():
    sel = select_gpus(plan_section(), gpus((80, 0.5), (48, 0.5)))
    plan = plan_selection(preset(effective_batch=16), llama_1b(), sel)
    assert plan.strategy == "ddp" and plan.world_size == 2
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.effective_batch == 16
    assert [g["device"] for g in plan.per_gpu] == ["cuda:0", "cuda:1"]
    # sized for the smaller GPU; the peak is the same on both, each against its own budget
    assert plan.per_gpu[0]["predicted_peak_gib"] == plan.per_gpu[1]["predicted_peak_gib"] == plan.predicted_peak_gib
    assert plan.per_gpu[1]["budget_gib"] < 48 < plan.per_gpu[0]["budget_gib"]
    assert plan.predicted_peak_gib <= plan.per_gpu[1]["budget_gib"]
    assert plan.gpu_uuid is None  # no pinning to one GPU
    text = render_plan(plan)
    assert "DDP over 2 processes" in text and "x 2 = 16" in text and "cuda:1 (NVIDIA Test 48GB)" in text
    assert plan.to_dict()["per_gpu"][0]["device"] == "cuda:0"


def test_fixed_micro_batch_and_accumulation_are_per_process():
    sel = select_gpus(plan_section(), gpus((80, 0.5), (80, 0.5)))
    plan = plan_selection(preset(effective_batch=16, micro_batch=4, grad_accum=2), llama_1b(), sel)
    assert (plan.micro_batch, plan.grad_accum, plan.effective_batch) == (4, 2, 16)
    with pytest.raises(PresetError, match="x 2 processes = 32"):
        plan_selection(preset(effective_batch=16, micro_batch=4, grad_accum=4), llama_1b(), sel)


def test_model_too_big_for_one_gpu_is_planned_as_fsdp2_and_run():
    sel = select_gpus(plan_section(), gpus((16, 0.5), (16, 0.5)))
    # an 8B in bf16 (16 GiB of weights) does not fit a 16 GB card with its training state; a half shard does
    plan = plan_selection(preset(name="meta-llama/Llama-3.1-8B", effective_batch=8, max_length=512), llama_8b(), sel)
    assert plan.strategy == "fsdp2" and plan.world_size == 2
    assert "the whole model does not fit one GPU" in str(plan.strategy_reason)
    # each rank holds half the weights, plus the two decoder layers it gathers whole at a time
    weights = plan.breakdown["weights"]
    assert plan.breakdown["fsdp2_shards_elsewhere"] == pytest.approx(-(weights / 2 - 2 * weights / 32), abs=2e-3)
    assert all(g["predicted_peak_gib"] <= g["budget_gib"] for g in plan.per_gpu)
    assert plan.gradient_checkpointing != "offload"
    refuse_unbuilt(plan)  # sftop runs FSDP2: nothing to refuse
    text = render_plan(plan)
    assert "FSDP2 over 2 processes" in text and text.count("peak ") >= 2
    # plan.strategy = "ddp" keeps DDP: the model does not fit, so the usual refusal
    with pytest.raises(ResourceError, match="does not fit"):
        plan_selection(
            preset(name="meta-llama/Llama-3.1-8B", effective_batch=8, max_length=512, strategy="ddp"), llama_8b(), sel
        )


def test_strategy_fsdp2_shards_a_model_that_would_fit_and_never_offloads():
    sel = select_gpus(plan_section(), gpus((80, 0.5), (80, 0.5)))
    ddp = plan_selection(preset(effective_batch=8), llama_1b(), sel)
    fsdp2 = plan_selection(preset(effective_batch=8, strategy="fsdp2"), llama_1b(), sel)
    assert (ddp.strategy, fsdp2.strategy) == ("ddp", "fsdp2")
    assert "plan.strategy = fsdp2" in str(fsdp2.strategy_reason)
    # each rank holds half the weights; the stock layers are sized (FSDP2 turns sftop's kernels off)
    assert fsdp2.breakdown["fsdp2_shards_elsewhere"] < 0 and "fsdp2_shards_elsewhere" not in ddp.breakdown
    assert (ddp.kernels, fsdp2.kernels) == (True, False)
    forced = plan_selection(
        preset(effective_batch=8, strategy="fsdp2", gradient_checkpointing="offload"), llama_1b(), sel
    )
    assert forced.gradient_checkpointing == "on" and any("offload became on under FSDP2" in n for n in forced.notes)


def test_fsdp_qlora_quantizes_on_the_gpu_when_the_4bit_weights_fit_it_else_on_the_cpu():
    sel = select_gpus(plan_section(), gpus((80, 0.5), (80, 0.5)))
    plan = plan_selection(
        preset(name="meta-llama/Llama-3.1-8B", effective_batch=8, load_in_4bit=True, strategy="fsdp2"), llama_8b(), sel
    )
    assert plan.load_in_4bit and plan.strategy == "fsdp2"
    assert any("4-bit weights are quantized on each GPU, then sharded" in n for n in plan.notes), plan.notes
    # a 70B's ~37 GiB of 4-bit weights do not fit a 24 GB card, a quarter of them does (Answer.AI's case)
    from transformers import LlamaConfig

    llama_70b = LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    small = select_gpus(plan_section(), gpus((24, 0.5), (24, 0.5), (24, 0.5), (24, 0.5)))
    big = preset(name="meta-llama/Llama-3.1-70B", effective_batch=8, max_length=512, load_in_4bit=True)
    plan = plan_selection(big, llama_70b, small)
    assert plan.strategy == "fsdp2" and plan.world_size == 4
    assert plan.breakdown["weights"] > 24 and all(g["predicted_peak_gib"] <= g["budget_gib"] for g in plan.per_gpu)
    assert any("quantized on the CPU (host memory)" in n for n in plan.notes), plan.notes
    from sftop.engine.train.fsdp import choose_4bit_load

    assert choose_4bit_load(plan.breakdown["weights"], plan.budget_gib) == "cpu"
    assert choose_4bit_load(5.0, plan.budget_gib) == "gpu"


def test_too_big_even_sharded_is_the_usual_refusal():
    sel = select_gpus(plan_section(), gpus((8, 0.5), (8, 0.5)))
    with pytest.raises(ResourceError, match="does not fit"):
        plan_selection(preset(name="meta-llama/Llama-3.1-8B"), llama_8b(), sel)


def test_cpu_processes_plan_and_rank_environment():
    sel = select_gpus(plan_section(gpus=2, device="cpu"), GpuStatus(reason="x"))
    from sftop.engine.planner.config import load_model_config

    demo = Preset.model_validate({"train": {"effective_batch": 4}, "data": {"max_length": 32}})
    plan = plan_selection(demo, load_model_config(demo), sel)
    assert (plan.device, plan.world_size, plan.strategy) == ("cpu", 2, "ddp")
    assert plan.micro_batch * plan.grad_accum == 2
    assert rank_info({}) == (0, 0, 1)
    env = {"SFTOP_DISTRIBUTED": "cpu", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert rank_info(env) == (1, 1, 2)
    assert (selection_in_rank(env).world_size, selection_in_rank(env).device) == (2, "cpu")
