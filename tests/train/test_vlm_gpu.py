"""Vision-language families on a real CUDA GPU: a few bf16 and 4-bit (QLoRA) training steps each,
and sftop's kernels on the language layers equal to the stock layers (loss and LoRA gradients).

Run on a GPU machine:  pytest -m gpu tests/train/test_vlm_gpu.py -q
"""

import copy

import pytest
import torch

from sftop.engine.models.vision.collator import VisionCollator
from sftop.engine.models.vision.lora_parts import target_module_names
from sftop.engine.models.vision.registry import all_families

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FAMILIES = sorted(all_families())
TOLERANCE = 1e-2


def _batch(family, processor, device):
    from test_vlm_families_e2e import _rows

    batch = VisionCollator(family, processor, max_length=4096)(_rows(family, 4))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _lora(model, family):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=target_module_names(model, family, None))
    )


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of two gradients (0 when equal)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _train_steps(model, batch, steps=4):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def _patched_equals_stock(stock, family, batch, reference=None):
    """sftop's kernels on the language layers (and on the vision tower where sftop knows it) give
    the stock loss and LoRA gradients within 1e-2.

    Both 16-bit runs round differently; where they differ by more than that directly, the patched
    run must be as close to an fp32 run of the same model (`reference`) as the stock run is, within
    1e-2: the kernels then add no error of their own beyond 16-bit rounding.
    """
    from sftop.engine.models.vision.loading import VLM_KERNEL_PARTS
    from sftop.kernels import patch_model

    from sftop.kernels.patching.towers import patch_towers

    patched = copy.deepcopy(stock)
    report = patch_model(patched, model_type=family.language_model_type, only=VLM_KERNEL_PARTS)
    assert report.any_fused, report.parts
    tower = patch_towers(patched)  # the Qwen-VL or SigLIP towers' own parts; "stock: ..." for the others
    report.parts.update(tower)
    loss_s, grads_s = _loss_and_grads(stock, batch)
    loss_p, grads_p = _loss_and_grads(patched, batch)
    assert grads_s.keys() == grads_p.keys() and grads_s
    loss_diff = abs(loss_p - loss_s) / max(1.0, abs(loss_s))
    grad_diff = max(_close(grads_p[n], grads_s[n]) for n in grads_s)
    print(f"{family.name}: patched vs stock: loss {loss_diff:.2e}, worst LoRA gradient {grad_diff:.2e}; {report.parts}")
    if (loss_diff > TOLERANCE or grad_diff > TOLERANCE) and reference is not None:
        ref_batch = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        loss_r, grads_r = _loss_and_grads(reference, ref_batch)
        stock_err = max(_close(grads_s[n], grads_r[n]) for n in grads_r)
        patched_err = max(_close(grads_p[n], grads_r[n]) for n in grads_r)
        print(f"{family.name}: against fp32: stock {stock_err:.2e}, patched {patched_err:.2e}")
        assert abs(loss_p - loss_r) <= abs(loss_s - loss_r) + TOLERANCE * max(1.0, abs(loss_r))
        assert patched_err <= stock_err + TOLERANCE, (patched_err, stock_err)
        return report
    assert loss_diff <= TOLERANCE, (loss_p, loss_s)
    assert grad_diff <= TOLERANCE, (grad_diff, report.parts)
    return report


def _dequantised_fp32(model):
    """An fp32 copy of a 4-bit LoRA model whose base weights are the NF4 weights dequantised: the
    exact model both 4-bit runs approximate."""
    import bitsandbytes.functional as bnbf
    from torch import nn

    ref = copy.deepcopy(model)
    for module in list(ref.modules()):
        base = getattr(module, "base_layer", None)
        if type(base).__name__ == "Linear4bit":
            weight = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            linear = nn.Linear(
                base.in_features,
                base.out_features,
                bias=base.bias is not None,
                device=weight.device,
                dtype=torch.float32,
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
                if base.bias is not None:
                    linear.bias.copy_(base.bias.float())
            linear.requires_grad_(False)
            module.base_layer = linear
    return ref.float()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_bf16_trains_and_kernels_match_stock(name):
    family = all_families()[name]
    processor = family.offline_processor()
    torch.manual_seed(0)
    reference = _lora(family.model_class().from_config(family.tiny_config()).to("cuda"), family)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    batch = _batch(family, processor, "cuda")
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    if family.language_model_type is not None:
        _patched_equals_stock(model, family, batch, reference)
    losses = _train_steps(model, batch)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", FAMILIES)
def test_family_4bit_keeps_vision_16bit_trains_and_kernels_match_stock(name, tmp_path):
    pytest.importorskip("bitsandbytes")
    from sftop.engine.models.vision.loading import load_vision_base, vision_module_names
    from sftop.engine.presets.schema import ModelSection

    family = all_families()[name]
    processor = family.offline_processor()
    torch.manual_seed(0)
    family.model_class().from_config(family.tiny_config()).save_pretrained(tmp_path / "model")
    section = ModelSection(name=str(tmp_path / "model"), load_in_4bit=True)
    base = load_vision_base(section, family, dtype="bf16", attn="sdpa")
    kinds = {n: type(m).__name__ for n, m in base.named_modules()}
    visual = vision_module_names(base, family)
    assert visual
    assert not any(k == "Linear4bit" for n, k in kinds.items() if any(n.startswith(v) for v in visual))
    assert any(k == "Linear4bit" for n, k in kinds.items() if ".language_model." in n or "text_model" in n)
    model = _lora(base, family)  # as sftop's loader does: no fp32 upcast of the 16-bit parts
    batch = _batch(family, processor, "cuda")
    if "pixel_values" in batch:  # what the trainer's bf16 autocast does for the vision tower
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    if family.language_model_type is not None:
        _patched_equals_stock(model, family, batch, _dequantised_fp32(model))
    losses = _train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_planner_predicts_a_vlm_step_peak_within_ten_percent():
    """Qwen2.5-VL-3B shape, 4 rows x 1024 tokens, one 448x448 picture per row, LoRA r=16."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from vlm_planner_peak import measure

    result = measure(rows=4, tokens=1024, image=448, r=16, checkpointing="on")
    print(result)
    assert 0.9 <= result["ratio"] <= 1.1, result
