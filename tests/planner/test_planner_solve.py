from __future__ import annotations

import json

import pytest
from _fake_nvml import FakeNvml, gpu
from _shapes import llama_1b, llama_8b, one_gpu, preset, qwen_1_5b

from sftop.engine.errors import PresetError, ResourceError
from sftop.engine.gpu import GpuStatus, read_gpus
from sftop.engine.planner import load_model_config, plan_run, render_plan

SIZES = (8, 16, 24, 48, 80)
ORDER = ("off", "on", "offload")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("make", [llama_1b, qwen_1_5b])
def test_plans_fit_and_keep_effective_batch(size, make):
    plan = plan_run(preset(), make(), gpus=one_gpu(size))
    assert plan.micro_batch * plan.grad_accum == plan.effective_batch == 16
    assert plan.predicted_peak_gib <= plan.budget_gib
    assert plan.headroom_gib == pytest.approx(plan.budget_gib - plan.predicted_peak_gib, abs=2e-3)
    assert plan.device == "cuda:0" and not plan.load_in_4bit
    assert plan.budget_gib < size  # other processes, reserve and the CUDA context come off
    assert plan.tokens_per_micro_batch == plan.micro_batch * 2048
    assert plan.predicted_relative_step_time == 1.0
    assert sum(plan.breakdown.values()) == pytest.approx(plan.predicted_peak_gib, abs=0.01)


def test_sensible_choices_for_llama_1b():
    big = plan_run(preset(), llama_1b(), gpus=one_gpu(80))
    assert big.gradient_checkpointing == "off" and big.micro_batch >= 8
    small = plan_run(preset(), llama_1b(), gpus=one_gpu(8))
    assert small.gradient_checkpointing in ("on", "offload")


@pytest.mark.parametrize("make,qlora", [(llama_1b, False), (qwen_1_5b, False), (llama_8b, True)])
def test_more_memory_never_gives_a_slower_or_smaller_plan(make, qlora):
    p = preset(load_in_4bit=qlora, effective_batch=32)
    previous = None
    for size in (6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 141):
        try:
            plan = plan_run(p, make(), gpus=one_gpu(size))
        except ResourceError:
            assert previous is None, f"fits at a smaller size but not at {size} GiB"
            continue
        if previous is not None:
            assert plan.modelled_step_s <= previous.modelled_step_s + 1e-12
            # a bigger GPU never forces more recomputation at the same micro-batch or a smaller batch with the same mode
            rung = (plan.gradient_checkpointing, plan.checkpoint_every_n_layers)
            if rung == (previous.gradient_checkpointing, previous.checkpoint_every_n_layers):
                assert plan.micro_batch >= previous.micro_batch
        previous = plan
    assert previous is not None


@pytest.mark.parametrize("effective", [1, 6, 7, 12, 16, 64])
def test_effective_batch_exact_for_awkward_sizes(effective):
    plan = plan_run(preset(effective_batch=effective), llama_1b(), gpus=one_gpu(24))
    assert plan.micro_batch * plan.grad_accum == effective
    assert all(c["micro_batch"] * c["grad_accum"] == effective for c in plan.candidates)


def test_fixed_plan_values_are_respected():
    p = preset(micro_batch=2)
    plan = plan_run(p, llama_1b(), gpus=one_gpu(80))
    assert (plan.micro_batch, plan.grad_accum) == (2, 8)
    plan = plan_run(preset(grad_accum=4), llama_1b(), gpus=one_gpu(80))
    assert (plan.micro_batch, plan.grad_accum) == (4, 4)
    for mode in ORDER:
        plan = plan_run(preset(gradient_checkpointing=mode), llama_1b(), gpus=one_gpu(24))
        assert plan.gradient_checkpointing == mode
        assert {c["gradient_checkpointing"] for c in plan.candidates} == {mode}
    plan = plan_run(preset(micro_batch=16, grad_accum=1, gradient_checkpointing="on"), llama_1b(), gpus=one_gpu(80))
    assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing) == (16, 1, "on")


def test_contradictory_or_non_dividing_plan_values_are_preset_errors():
    with pytest.raises(PresetError, match="effective_batch is 16"):
        plan_run(preset(micro_batch=4, grad_accum=2), llama_1b(), gpus=one_gpu(80))
    with pytest.raises(PresetError, match="does not divide") as err:
        plan_run(preset(micro_batch=3), llama_1b(), gpus=one_gpu(80))
    assert "1, 2, 4, 8, 16" in str(err.value)


def test_fixed_load_in_4bit_false_is_never_switched_but_suggested():
    with pytest.raises(ResourceError) as err:
        plan_run(preset("meta-llama/Llama-3.1-8B-Instruct"), llama_8b(), gpus=one_gpu(16))
    text = str(err.value)
    assert "Llama-3.1-8B-Instruct does not fit" in text
    assert "needs" in text and "15." in text  # the budget left on a 16 GiB card
    assert "model.load_in_4bit = true" in text
    assert "GB such as" in text  # a GPU size that would fit
    need = err.value.needed_gib
    assert 16 < need < 24
    assert "24 GB" in text
    # every plan at any size keeps bf16
    assert not plan_run(preset("x"), llama_8b(), gpus=one_gpu(80)).load_in_4bit


def test_refusal_names_the_smallest_need_and_working_options():
    with pytest.raises(ResourceError) as err:
        plan_run(
            preset("meta-llama/Llama-3.1-8B-Instruct", load_in_4bit=True, max_length=8192), llama_8b(), gpus=one_gpu(8)
        )
    text = str(err.value)
    assert "4-bit" in text and "8192 tokens per row" in text
    assert "data.max_length = " in text  # a shorter length that fits
    assert "load_in_4bit = true" not in text  # already on
    assert err.value.exit_code == 3


def test_refusal_with_fixed_values_suggests_auto():
    with pytest.raises(ResourceError) as err:
        plan_run(preset(micro_batch=16, gradient_checkpointing="off"), llama_1b(), gpus=one_gpu(24))
    assert 'to "auto"' in str(err.value)


def test_two_gpus_plan_for_the_one_with_most_free_memory():
    status = read_gpus(FakeNvml([gpu(0, 24.0, used=2.0), gpu(1, 48.0, used=40.0), gpu(2, 48.0, used=1.0)]), env={})
    plan = plan_run(preset(), llama_1b(), gpus=status)
    assert plan.device == "cuda:2"
    assert plan.gpu_uuid == status.gpus[2].uuid
    assert any("most free memory" in n for n in plan.notes)


def test_other_process_holding_memory_shrinks_the_plan():
    empty = plan_run(preset(), llama_1b(), gpus=one_gpu(80))
    busy = plan_run(preset(), llama_1b(), gpus=one_gpu(80, used_gib=70))
    assert busy.budget_gib < 10 < empty.budget_gib
    assert busy.predicted_peak_gib <= busy.budget_gib
    assert busy.modelled_step_s > empty.modelled_step_s
    assert any("other processes hold 70.0 GiB" in n for n in busy.notes)


def test_cuda_visible_devices_decides_the_device_name():
    backend = FakeNvml([gpu(0, 80.0, used=79.0), gpu(1, 24.0), gpu(2, 48.0)])
    status = read_gpus(backend, env={"CUDA_VISIBLE_DEVICES": "0,2"})
    plan = plan_run(preset(), llama_1b(), gpus=status)
    assert plan.device == "cuda:1"  # NVML GPU 2 is CUDA device 1 here
    assert plan.gpu_name == "NVIDIA Test 48GB"


def test_hypothetical_gpu_memory():
    plan = plan_run(preset(), llama_1b(), gpus=GpuStatus(reason="no driver"), gpu_memory_gib=24)
    assert plan.device == "cuda:0" and "hypothetical 24 GiB" in plan.gpu_name
    assert plan.budget_gib == pytest.approx(24 - 0.48, abs=0.01)
    with pytest.raises(PresetError):
        plan_run(preset(), llama_1b(), gpu_memory_gib=0)


def test_no_gpu_plans_the_demo_on_cpu_and_refuses_big_models():
    demo = preset("builtin:demo-tiny", max_length=64)
    no_gpu = GpuStatus(reason="NVIDIA driver not found (libnvidia-ml.so): install the driver")
    plan = plan_run(demo, load_model_config(demo), gpus=no_gpu)
    assert plan.device == "cpu" and plan.dtype == "fp32" and not plan.kernels
    assert "CPU" in plan.reason and "driver not found" in plan.reason
    assert plan.micro_batch * plan.grad_accum == 16
    assert plan.breakdown["cuda_context"] == 0 and plan.breakdown["cublas_workspace"] == 0
    assert "peak RAM" in render_plan(plan)
    with pytest.raises(ResourceError, match="too big to train on the CPU"):
        plan_run(preset(), llama_1b(), gpus=no_gpu)
    with pytest.raises(ResourceError, match="load_in_4bit needs a CUDA GPU"):
        plan_run(preset("builtin:demo-tiny", load_in_4bit=True), load_model_config(demo), gpus=no_gpu)


def test_padded_batches_rank_by_padding_too():
    plan = plan_run(preset(packing=False), llama_1b(), gpus=one_gpu(80), row_tokens_mean=420)
    assert plan.micro_batch * plan.grad_accum == 16 and not plan.packing


def test_whole_run_case_packs_the_step_into_one_micro_batch_on_an_h100():
    # benchmarks/whole_run.py: 8 short chat rows per step, Llama-3.2-1B shape, H100 80 GB
    plan = plan_run(
        preset(effective_batch=8, max_length=2048), llama_1b(), gpus=one_gpu(79.6, used_gib=0.5), row_tokens_mean=420
    )
    assert (plan.micro_batch, plan.grad_accum) == (8, 1)
    assert plan.gradient_checkpointing == "off"


def test_to_dict_is_json_and_render_shows_breakdown():
    plan = plan_run(preset(), llama_1b(), gpus=one_gpu(24))
    data = json.loads(json.dumps(plan.to_dict()))
    for key in (
        "micro_batch",
        "grad_accum",
        "gradient_checkpointing",
        "load_in_4bit",
        "device",
        "predicted_peak_gib",
        "budget_gib",
        "headroom_gib",
        "breakdown",
        "predicted_relative_step_time",
        "candidates",
        "tokens_per_micro_batch",
        "reason",
    ):
        assert key in data
    assert "context" not in data
    text = render_plan(plan)
    assert "Memory breakdown (GiB)" in text and "saved activations" in text and "CUDA context" in text
    assert f"{plan.predicted_peak_gib:8.3f}" in text
    assert "\033[" not in text and "\033[" in render_plan(plan, color=True)


def test_partial_checkpointing_fills_the_gap_between_off_and_on():
    # Between "on" and "off" in memory, recomputing only some blocks is the fastest that fits.
    seen = set()
    for size in (10, 12, 14, 16, 20, 24, 28, 32):
        plan = plan_run(preset(), llama_1b(), gpus=one_gpu(size))
        seen.add((plan.gradient_checkpointing, plan.checkpoint_every_n_layers))
        if plan.checkpoint_every_n_layers > 1:
            assert plan.gradient_checkpointing == "on"
            assert "blocks" in render_plan(plan)
            assert plan.to_dict()["checkpoint_every_n_layers"] == plan.checkpoint_every_n_layers
    assert any(n > 1 for _, n in seen)


def test_fixed_checkpointing_on_means_every_block():
    plan = plan_run(preset(gradient_checkpointing="on"), llama_1b(), gpus=one_gpu(80))
    assert plan.checkpoint_every_n_layers == 1
    assert {c["checkpoint_every_n_layers"] for c in plan.candidates} == {1}


def test_lora_targets_subset_and_unknown_names():
    from sftop.engine.presets.schema import Preset

    def with_targets(targets):
        p = preset()
        return Preset.model_validate({**p.model_dump(), "lora": {"r": 16, "targets": targets}})

    qv = plan_run(with_targets(["q_proj", "v_proj"]), llama_1b(), gpus=one_gpu(80))
    full = plan_run(
        preset(micro_batch=qv.micro_batch, gradient_checkpointing=qv.gradient_checkpointing),
        llama_1b(),
        gpus=one_gpu(80),
    )
    assert qv.breakdown["lora_params"] < full.breakdown["lora_params"]
    fused = plan_run(with_targets(["qkv_proj"]), llama_1b(), gpus=one_gpu(80))
    assert fused.breakdown["lora_params"] == plan_run(preset(), llama_1b(), gpus=one_gpu(80)).breakdown["lora_params"]
    assert any("qkv_proj" in n and "upper bound" in n for n in fused.notes)


def test_rungs_are_distinct():
    from sftop.engine.planner.solve import rungs

    assert rungs(16) == [("off", 1), ("on", 4), ("on", 3), ("on", 2), ("on", 1), ("offload", 1)]
    assert rungs(4) == [("off", 1), ("on", 3), ("on", 1), ("offload", 1)]  # 1 in 2 = 1 in 3 here: 2 blocks
    assert rungs(1) == [("off", 1), ("on", 1), ("offload", 1)]
    assert rungs(16, "on") == [("on", 1)]


def test_models_the_kernels_do_not_cover_are_sized_stock():
    fixed = preset(micro_batch=4, gradient_checkpointing="off")
    covered = plan_run(fixed, llama_1b(), gpus=one_gpu(80))
    assert covered.kernels and covered.loss == "fused"
    # the same shape under a model type sftop.kernels.patch_model does not fuse: patch_model leaves it stock
    other = {**llama_1b().to_dict(), "model_type": "olmo"}
    stock = plan_run(fixed, other, gpus=one_gpu(80))
    assert not stock.kernels and stock.loss == "chunked"
    assert any("do not cover model type 'olmo'" in n for n in stock.notes)
    assert stock.predicted_peak_gib > covered.predicted_peak_gib
    # a VLM's text model is a covered family, but patch_model sees the outer model type
    vlm = {"model_type": "gemma3", "text_config": {**llama_1b().to_dict(), "model_type": "gemma3_text"}}
    assert not plan_run(preset(), vlm, gpus=one_gpu(80)).kernels


def test_packed_attention_is_planned_only_where_the_patch_will_apply(monkeypatch):
    import sftop.kernels.varlen_attention as va

    # the CPU here has no flash attention; pretend a capable GPU is present
    monkeypatch.setattr(va, "varlen_available", lambda: (True, ""))
    fixed = preset(micro_batch=8, gradient_checkpointing="off")
    packed = plan_run(fixed, llama_1b(), gpus=one_gpu(80))
    assert packed.attention == "varlen" and "attention_mask" not in packed.breakdown
    sdpa = plan_run(preset(micro_batch=8, gradient_checkpointing="off", packing=False), llama_1b(), gpus=one_gpu(80))
    assert sdpa.attention == "sdpa"
    sliding = {**llama_1b().to_dict(), "layer_types": ["sliding_attention", "full_attention"] * 8}
    assert plan_run(fixed, sliding, gpus=one_gpu(80)).attention == "sdpa"
    # a hypothetical GPU may be too old for flash attention: sized for SDPA's mask, the safe side
    assert plan_run(fixed, llama_1b(), gpu_memory_gib=80).attention == "sdpa"
    monkeypatch.setattr(va, "varlen_available", lambda: (False, "no CUDA GPU"))
    without = plan_run(fixed, llama_1b(), gpus=one_gpu(80))
    assert without.attention == "sdpa"
    # packed rows through sftop's packed attention also replay CUDA graphs, whose pool SDPA's run
    # never holds; the step itself needs less without the mask
    assert packed.breakdown["graph_pool"] > 0 and "graph_pool" not in without.breakdown
    assert without.predicted_peak_gib > packed.predicted_peak_gib - packed.breakdown["graph_pool"]


def test_render_says_when_packed_rows_use_flash_attention(monkeypatch):
    import sftop.kernels.varlen_attention as va

    monkeypatch.setattr(va, "varlen_available", lambda: (True, ""))
    text = render_plan(plan_run(preset(), llama_1b(), gpus=one_gpu(80)))
    assert "flash attention over row boundaries" in text
    monkeypatch.setattr(va, "varlen_available", lambda: (False, "no CUDA GPU"))
    assert "flash attention" not in render_plan(plan_run(preset(), llama_1b(), gpus=one_gpu(80)))
