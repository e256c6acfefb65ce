"""Gemma 3's vision-language model on a CUDA GPU in bf16 through sftop's kernels, patched as
`sftop run` patches it (loading.apply_vision_kernels): Gemma-3-4B's layer widths (text 2560 wide,
8 heads of 256, 4 K/V heads, 10240 MLP, its 262K vocabulary; SigLIP 1152 wide, 16 heads of 72,
896x896 images in 14-pixel patches, 256 soft tokens an image), two layers each, a local layer whose
window (128) is narrower than an image's 256 tokens, so its mask joins the window with the image
block.  Patched loss and LoRA gradients equal stock's within 1e-2, or, where the two bf16 runs
round apart by more, the patched run is as close to an fp32 run as stock is (as
tests/train/test_vlm_gpu.py judges, over all LoRA gradients together).

Run on a GPU machine:  pytest -m gpu tests/vision/test_gemma3_kernels_gpu.py -q -s
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = 1e-2
LANGUAGE_FUSED = ("rms_norm", "rope", "mlp", "lora", "attention_lora", "loss")
TOWER_FUSED = ("vision_qkv_lora", "vision_patch_embed")


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096,
        ),
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=2,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
        ),
        mm_tokens_per_image=256,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # random init leaves the projector at zeros: open the image path
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.normal_(0.0, w.shape[0] ** -0.5)
    targets = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        r"|.*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
    )
    return get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    )


def _batch(config, rows: int = 2, seq: int = 600):
    g = torch.Generator().manual_seed(1)
    boi, img, eoi = config.boi_token_index, config.image_token_index, config.eoi_token_index
    prefix = 9  # text before the image: the image block does not start the row
    n_text = seq - prefix - 256 - 2
    ids = torch.cat(
        [
            torch.randint(10, 200000, (rows, prefix), generator=g),
            torch.full((rows, 1), boi),
            torch.full((rows, 256), img),
            torch.full((rows, 1), eoi),
            torch.randint(10, 200000, (rows, n_text), generator=g),
        ],
        dim=1,
    )
    labels = ids.clone()
    labels[:, : prefix + 256 + 2] = -100
    batch = dict(
        input_ids=ids,
        labels=labels,
        attention_mask=torch.ones_like(ids),
        token_type_ids=(ids == img).long(),
        pixel_values=torch.randn(rows, 3, 896, 896, generator=g),
    )
    return {k: v.cuda() for k, v in batch.items()}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return float(loss), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_gemma3_bf16_patched_equals_stock():
    from sftop.engine.models.vision import loading
    from sftop.engine.models.vision.registry import all_families

    reference = _model()
    stock = copy.deepcopy(reference).to(torch.bfloat16)
    patched = copy.deepcopy(stock)
    report = loading.apply_vision_kernels(patched, all_families()["gemma3"], "auto")
    parts, tower = report["parts"], report["vision_parts"]
    assert {p: parts[p] for p in LANGUAGE_FUSED} == {p: "fused" for p in LANGUAGE_FUSED}, parts
    assert "both ways" in parts["attention"], parts["attention"]
    assert {p: tower[p] for p in TOWER_FUSED} == {p: "fused" for p in TOWER_FUSED}, tower
    for m in (reference, stock, patched):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    batch = _batch(stock.get_base_model().config)
    bf16_batch = dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))
    loss_s, grads_s = _loss_and_grads(stock, bf16_batch)
    loss_p, grads_p = _loss_and_grads(patched, bf16_batch)
    lora = [n for n in grads_s if "lora_" in n]
    assert grads_s.keys() == grads_p.keys() and any("vision_tower" in n for n in lora)
    loss_diff = abs(loss_p - loss_s) / max(1.0, abs(loss_s))
    grad_diff = _close(_joined(grads_p, lora), _joined(grads_s, lora))
    print(
        f"gemma3 bf16 patched vs stock: loss {loss_s:.4f} / {loss_p:.4f} ({loss_diff:.2e}), LoRA gradients {grad_diff:.2e}"
    )
    assert loss_diff <= TOLERANCE, (loss_p, loss_s)
    if grad_diff <= TOLERANCE:
        return
    # two bf16 runs rounding apart: the patched one must be as close to fp32 as stock is, over all
    # LoRA gradients, and no tensor of it much further off than stock's (a wrong one is ~100% off)
    _, grads_r = _loss_and_grads(reference, batch)
    stock_err = _close(_joined(grads_s, lora), _joined(grads_r, lora))
    patched_err = _close(_joined(grads_p, lora), _joined(grads_r, lora))
    print(f"gemma3 against fp32: stock {stock_err:.2e}, patched {patched_err:.2e}")
    assert patched_err <= stock_err + TOLERANCE, (patched_err, stock_err)
    for n in lora:
        assert _close(grads_p[n], grads_r[n]) <= 2 * _close(grads_s[n], grads_r[n]) + TOLERANCE, n


def _joined(grads, names):
    return torch.cat([grads[n].flatten() for n in names])
