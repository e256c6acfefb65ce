"""dpo.share_prompt through sftop's DPO trainer: the collator lays each batch out with every pair's
prompt once, and a training step (reference forward, then the policy's forward and backward
through the fused log-prob head) gives the same loss, metrics and LoRA gradients as the padded
batch.  On the CPU the packed attention the layout needs is switched on by hand, as the attention
part does on a GPU."""

from __future__ import annotations

import torch

from train_helpers import dpo_trainer


def _trainer(tmp_path, share: bool):
    import sftop.kernels as K
    from sftop.engine.presets import load_preset
    from sftop.kernels import compat
    from sftop.kernels.varlen_attention import NAME, register

    preset, _ = load_preset(
        "demo-dpo",
        ['train.kernels="off"', "data.max_rows=8", 'model.adapter=""', f"dpo.share_prompt={str(share).lower()}"],
    )
    preset = preset.model_copy(update={"model": preset.model.model_copy(update={"adapter": None})})

    def patched(model):
        # what a GPU run's kernels do on this model: the fused parts, and the packed attention
        K.patch_model(model)
        register()
        compat.set_config_attn_implementation(model.get_base_model().config, NAME)
        return model

    import sftop.engine.models.loading as loading

    real = loading.load_model

    def load_patched(p):
        model, tok, info = real(p)
        return patched(model), tok, info

    loading.load_model = load_patched
    try:
        trainer, batch = dpo_trainer(preset, tmp_path, kernel_head=True, share_prompt=share)
    finally:
        loading.load_model = real
    return trainer, batch


def _step(trainer, batch):
    from sftop.engine.train.dpo_batch_check import SHARED_PROMPT_KEY

    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, dict(batch), return_outputs=False)
    loss.backward()
    metrics = trainer.sftop_metrics.pending.pop()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), metrics, grads, SHARED_PROMPT_KEY in batch


def test_a_dpo_step_with_each_prompt_once_equals_the_padded_batch(home, tmp_path, monkeypatch):
    from sftop.kernels import shared_prompt as SP

    calls = []
    real = SP.shared_prompt_logprobs
    monkeypatch.setattr(SP, "shared_prompt_logprobs", lambda *a: (calls.append(1), real(*a))[1])
    padded, batch_p = _trainer(tmp_path / "padded", share=False)
    shared, batch_s = _trainer(tmp_path / "shared", share=True)
    assert padded.sftop_shared_prompt == "off: dpo.share_prompt = false"
    assert shared.sftop_shared_prompt == "on", shared.sftop_shared_prompt
    loss_p, metrics_p, grads_p, carried_p = _step(padded, batch_p)
    assert calls == [] and not carried_p
    loss_s, metrics_s, grads_s, carried_s = _step(shared, batch_s)
    assert carried_s and calls == [1, 1]  # the reference forward and the policy's
    layout = batch_s["sftop_shared_prompt"]
    assert layout.tokens < layout.rows_tokens  # the prompts ran once
    assert abs(loss_s - loss_p) < 1e-5 * max(1.0, abs(loss_p))
    assert torch.allclose(metrics_s, metrics_p, rtol=1e-4, atol=1e-5), (metrics_s, metrics_p)
    assert grads_s.keys() == grads_p.keys() and any("lora_" in n for n in grads_p)
    for n, g in grads_p.items():
        assert torch.allclose(grads_s[n], g, rtol=1e-3, atol=1e-6), n
