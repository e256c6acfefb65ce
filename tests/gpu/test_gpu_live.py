"""On a machine with an NVIDIA GPU: NVML's view agrees with CUDA's, and a planned step fits.

Skipped without CUDA (CI); run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GIB = 1024**3


def test_nvml_matches_cuda():
    from sftop.engine.gpu import read_gpus, sample_gpus

    status = read_gpus()
    assert status.ok, status.reason
    assert len(status.gpus) == torch.cuda.device_count()
    for g in status.gpus:
        props = torch.cuda.get_device_properties(g.index)
        # CUDA reports a little less than NVML (reserved by the driver); same card, same order
        assert abs(props.total_memory - g.memory_total_bytes) < 1 * GIB
        free, total = torch.cuda.mem_get_info(g.index)
        assert abs(free - g.memory_free_bytes) < 1.5 * GIB
        assert g.name and g.uuid and g.uuid.startswith("GPU-")
    samples = sample_gpus()
    assert len(samples) == len(status.gpus)
    assert all(s.memory_total_gib and s.memory_used_gib is not None for s in samples)


def test_planned_step_of_a_small_llama_fits_its_prediction():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftop.engine.planner import check_probe, plan_run, probe_shape
    from sftop.engine.presets.schema import Preset

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    preset = Preset.model_validate(
        {
            "name": "live",
            "model": {"name": "local-test", "attn_implementation": "sdpa"},
            "data": {"max_length": 1024, "packing": False},
            "train": {"effective_batch": 8, "kernels": "off"},
            "plan": {"micro_batch": 4, "gradient_checkpointing": "off"},
        }
    )
    plan = plan_run(preset, config)
    rows, seq = probe_shape(plan)
    assert (rows, seq) == (4, 1024)
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    # TRL's chunked head is what plan.loss == "chunked" assumes; it goes on before PEFT, as in SFTTrainer
    add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, 32000, (rows, seq), device="cuda")
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    (-out.log_probs.sum() / out.label_mask.sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    verdict = check_probe(plan, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
    assert verdict.ok, verdict.reason
    # a loose sanity bound; benchmarks/planner_accuracy.py is the real accuracy measurement
    assert 0.6 < verdict.ratio < 1.5, verdict.reason
