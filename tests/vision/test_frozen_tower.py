"""A frozen vision tower runs no backward (sftop/engine/models/vision/frozen_tower.py).

transformers' enable_input_require_grads marks the tower's patch embeddings as needing a gradient,
so with LoRA on the language model only the stock step runs the tower's whole backward for a
gradient that reaches no trainable weight.  With the hooks installed: the same loss and LoRA
gradients, and no backward through the tower's blocks; a tower with LoRA of its own trains as usual.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from vision_family_rows import family, image, processor, rows, single

from sftop.engine.models.vision import frozen_tower
from sftop.engine.models.vision.collator import VisionCollator
from sftop.engine.models.vision.lora_parts import target_module_names
from sftop.engine.models.vision.registry import all_families


def _lora_model(name: str, parts: list[str]):
    fam = family(name)
    torch.manual_seed(0)
    model = all_families()[name].model_class().from_config(fam.tiny_config(), attn_implementation="sdpa")
    targets = target_module_names(model, fam, parts)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _batch(name: str):
    collate = VisionCollator(family(name), processor(name))
    return collate([single(image(name, 2, 3)), rows(name)["two-turns"]])


def _step(model, batch, block):
    calls = []
    handle = block.register_full_backward_hook(lambda *_a: calls.append(1))
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


def _first_block(tower):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return next(m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer))


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_a_frozen_tower_runs_no_backward_and_the_adapters_learn_the_same(name):
    stock = _lora_model(name, ["language", "attention", "mlp"])
    hooked = copy.deepcopy(stock)
    assert frozen_tower.install(hooked).startswith("on:")
    (tower,) = frozen_tower.vision_towers(hooked)
    (stock_tower,) = frozen_tower.vision_towers(stock)
    batch = _batch(name)
    loss_s, grads_s, calls_s = _step(stock, batch, _first_block(stock_tower))
    loss_h, grads_h, calls_h = _step(hooked, batch, _first_block(tower))
    assert calls_s >= 1 and calls_h == 0  # the stock step ran the frozen tower's backward
    assert torch.equal(loss_h, loss_s)
    assert grads_h.keys() == grads_s.keys() and grads_s and all("language_model" in n for n in grads_s)
    for n in grads_s:
        assert torch.allclose(grads_h[n], grads_s[n], rtol=1e-5, atol=1e-7), n
    assert torch.is_grad_enabled()  # the grad mode came back


def test_a_tower_with_adapters_trains_as_before():
    stock = _lora_model("qwen2_5_vl", ["language", "vision", "attention", "mlp"])
    hooked = copy.deepcopy(stock)
    frozen_tower.install(hooked)
    (tower,) = frozen_tower.vision_towers(hooked)
    (stock_tower,) = frozen_tower.vision_towers(stock)
    batch = _batch("qwen2_5_vl")
    _loss_s, grads_s, calls_s = _step(stock, batch, _first_block(stock_tower))
    _loss_h, grads_h, calls_h = _step(hooked, batch, _first_block(tower))
    assert calls_h == calls_s >= 1
    assert any(".visual.blocks." in n for n in grads_h) and grads_h.keys() == grads_s.keys()
    for n in grads_s:
        assert torch.equal(grads_h[n], grads_s[n]), n
    # decided per call: the tower's adapters frozen later, its backward stops
    for p in tower.parameters():
        p.requires_grad_(False)
    _loss, grads, calls = _step(hooked, batch, _first_block(tower))
    assert calls == 0 and grads and not any(".visual." in n for n in grads)
    frozen_tower.uninstall(hooked)
    assert not tower._forward_pre_hooks and not tower._forward_hooks


def test_the_grad_mode_comes_back_when_the_tower_raises():
    model = _lora_model("qwen2_5_vl", ["language", "attention", "mlp"])
    frozen_tower.install(model)
    (tower,) = frozen_tower.vision_towers(model)
    with pytest.raises(RuntimeError, match="is invalid for input"):  # pixels of the wrong width
        tower(torch.zeros(3, 5), grid_thw=torch.tensor([[1, 1, 1]]))
    assert torch.is_grad_enabled()


def test_the_loader_installs_it_and_says_so(tmp_path):
    from sftop.engine.models.vision.loading import load_vision_model
    from sftop.engine.presets.schema import Preset

    fam = family("qwen2_5_vl")
    model_dir = tmp_path / "tiny-qwen-vl"
    fam.tiny_model().save_pretrained(model_dir)
    processor("qwen2_5_vl").save_pretrained(model_dir)
    preset = Preset.model_validate({"model": {"name": str(model_dir)}, "train": {"kernels": "off"}})
    model, _proc, info = load_vision_model(preset, fam)
    (tower,) = frozen_tower.vision_towers(model)
    assert tower._forward_pre_hooks and info.kernels["frozen_tower"].startswith("on:")
