"""Qwen2-VL and Qwen2.5-VL: sftop's kernel family file (sftop/kernels/patching/families/qwen_vl.py)
puts norm, RoPE (multimodal positions folded into cos/sin), q/k/v, MLP and loss kernels into the
language layers, leaves the vision tower alone, and gives the stock loss and LoRA gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from vision_family_rows import family, image, processor, rows, single

from sftop.engine.models.vision.collator import VisionCollator
from sftop.engine.models.vision.loading import vlm_kernel_parts
from sftop.engine.models.vision.lora_parts import target_module_names
from sftop.kernels import patch_model, unpatch
from sftop.kernels.patching import markers

FUSED_PARTS = ("rms_norm", "rope", "mlp", "lora", "attention_lora", "loss")
# the Triton interpreter runs on the CPU only: on a GPU machine the kernels run there
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))  # NaN compares False: fails


def _lora_model(name: str):
    from peft import LoraConfig, get_peft_model

    fam = family(name)
    model = fam.tiny_model(seed=3).to(DEVICE)
    # the language layers only, B != 0 so that every adapter gradient is non-trivial
    targets = target_module_names(model, fam, ["language", "attention", "mlp"])
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    )


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_language_layers_take_the_kernels_and_match_stock(name, monkeypatch):
    import sftop.kernels.rope as rope

    fam = family(name)
    batch = VisionCollator(fam, processor(name))([single(image(name, 2, 3)), rows(name)["two-turns"]])
    assert "mm_token_type_ids" in batch and batch["image_grid_thw"].shape[0] == 2
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    stock = _lora_model(name)
    fused = copy.deepcopy(stock)
    only = vlm_kernel_parts(fused)
    assert "loss" in only
    report = patch_model(fused, model_type=fam.language_model_type, only=only)
    assert {p: report.parts[p] for p in FUSED_PARTS} == {p: "fused" for p in FUSED_PARTS}, report.parts
    assert report.parts["attention"].startswith("stock: ")
    base = fused.get_base_model()
    patched = {n for n, m in base.named_modules() if markers.ORIG_FORWARD in vars(m)}
    assert any(".language_model.layers.0.input_layernorm" in n for n in patched)
    assert any(".language_model.layers.1.self_attn" in n for n in patched)
    assert not any(".visual." in n and "lora" not in n for n in patched), sorted(patched)

    launches = []
    real = rope._launch
    monkeypatch.setattr(rope, "_launch", lambda *a, **k: (launches.append(k["backward"]), real(*a, **k))[1])
    for m in (stock, fused):
        m.train()
    s_out, s_grads = _loss_and_grads(stock, batch)
    f_out, f_grads = _loss_and_grads(fused, batch)
    # the RoPE kernel ran on the multimodal cos/sin: two layers, forward and backward
    assert launches.count(False) == 2 and launches.count(True) == 2
    assert f_out.logits is None  # the fused loss, no full logits
    assert rel_err(f_out.loss, s_out.loss) < 1e-5
    assert s_grads.keys() == f_grads.keys() and len(s_grads) > 0
    for n, g in s_grads.items():
        assert g.abs().sum() > 0, n
        assert rel_err(f_grads[n], g) < 1e-4, n

    unpatch(fused)
    u_out, u_grads = _loss_and_grads(fused, batch)
    assert u_out.logits is not None and rel_err(u_out.loss, s_out.loss) < 1e-6


@pytest.mark.parametrize("chunked", [False, True], ids=["default", "SFTOP_CHUNKED_MLP"])
def test_chunked_mlp_reaches_the_language_layers_under_checkpointing(chunked, monkeypatch, gate_up_chunks):
    """With SFTOP_CHUNKED_MLP=1 a Qwen2.5-VL model's language layers get lean recomputation, so
    their checkpointed MLPs rebuild gate and up in token chunks in backward (none in the
    recomputation); loss and LoRA gradients stay the stock model's. Unset, neither applies."""
    import sftop.kernels.lora_mlp as lm

    name = "qwen2_5_vl"
    if chunked:
        monkeypatch.setenv("SFTOP_CHUNKED_MLP", "1")
    else:
        monkeypatch.delenv("SFTOP_CHUNKED_MLP", raising=False)
    fam = family(name)
    batch = VisionCollator(fam, processor(name))([single(image(name, 2, 3)), rows(name)["two-turns"]])
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    stock = _lora_model(name)
    fused = copy.deepcopy(stock)
    report = patch_model(fused, model_type=fam.language_model_type, only=vlm_kernel_parts(fused))
    assert (report.parts["lean_recompute"] == "fused") == chunked, report.parts["lean_recompute"]
    tokens = batch["input_ids"].numel()
    monkeypatch.setattr(lm, "REGATE_CHUNK_BYTES", (tokens // 3) * fused.config.text_config.intermediate_size * 4)
    for m in (stock, fused):
        m.train()
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    s_out, s_grads = _loss_and_grads(stock, batch)
    f_out, f_grads = _loss_and_grads(fused, batch)
    layers = fused.config.text_config.num_hidden_layers
    chunks = -(-tokens // lm._regate_rows(tokens, fused.config.text_config.intermediate_size, 4))
    assert chunks > 1 or not chunked
    # every layer: its chunks in the first run and again in backward; nothing in the recomputation
    assert gate_up_chunks == {"first run or backward": 2 * layers * chunks if chunked else 0, "recomputation": 0}
    assert rel_err(f_out.loss, s_out.loss) < 1e-5
    for n, g in s_grads.items():
        assert rel_err(f_grads[n], g) < 1e-4, n
