"""Lean recomputation (sftop/kernels/recompute.py, patch part lean_recompute): under gradient
checkpointing the fused LoRA MLP skips its down projection when its layer is recomputed, and the
gradients stay those of the stock model."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import sftop.kernels as K
import sftop.kernels.lora_mlp as lm
from sftop.kernels.recompute import checkpoint_marking_recompute, recomputing

from _kernel_testutil import rel_err
from _tiny_models import tiny_model, twin


def test_only_the_recomputation_is_marked():
    seen = []
    lin = torch.nn.Linear(8, 8)

    def layer(x):
        seen.append(recomputing())
        y = torch.tanh(lin(x))
        return torch.sigmoid(y) * 2  # saves after the point where torch may stop recomputing

    x = torch.randn(3, 8, requires_grad=True)
    out = checkpoint_marking_recompute(layer, x, use_reentrant=False)
    assert seen == [False] and not recomputing()
    out.sum().backward()
    assert seen == [False, True]
    assert not recomputing()  # reset after torch's early-stop exception too

    # the same gradients as plain checkpointing
    g = x.grad.clone()
    x.grad = None
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert torch.equal(g, x.grad)


def _down_projections(monkeypatch):
    """Count the down projections lora_mlp runs, split by whether they ran in a recomputation."""
    counts = {"forward": 0, "recompute": 0}
    real = lm._project

    def counting(inp, base, a, b, scale):
        if base.in_features > base.out_features:  # down: intermediate -> hidden
            counts["recompute" if recomputing() else "forward"] += 1
        return real(inp, base, a, b, scale)

    monkeypatch.setattr(lm, "_project", counting)
    return counts


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_recomputed_layers_skip_the_down_projection_with_stock_gradients(monkeypatch, poison, family):
    stock = tiny_model(family)
    fused = twin(stock)
    report = K.patch_model(fused)
    assert report.parts["lean_recompute"] == "fused"
    for m in (stock, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = _down_projections(monkeypatch)
    ids = torch.randint(3, 300, (2, 11), device=next(stock.parameters()).device)
    losses = []
    for m in (stock, fused):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    # two layers: the forward pass projects twice, the two recomputations not at all
    assert counts == {"forward": 2, "recompute": 0}
    assert rel_err(losses[1], losses[0]) < 1e-5
    stock_grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), n  # the skipped output (NaN-poisoned) never leaks
            assert rel_err(p.grad, stock_grads[n]) < 1e-4, n


def test_reentrant_checkpointing_recomputes_everything(monkeypatch):
    m = tiny_model("llama")
    K.patch_model(m)
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    counts = _down_projections(monkeypatch)
    ids = torch.randint(3, 300, (1, 9), device=next(m.parameters()).device)
    m(input_ids=ids, labels=ids).loss.backward()
    assert counts == {"forward": 4, "recompute": 0}  # unmarked: the recomputation runs in full


def test_part_stays_stock_without_the_fused_lora_mlp():
    m = tiny_model("llama", target_modules=["q_proj", "v_proj"])
    report = K.patch_model(m)
    assert report.parts["lean_recompute"].startswith("stock: needs the fused LoRA MLP")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_recomputes_in_full(monkeypatch, family):
    # Gemma normalises the MLP output (post_feedforward_layernorm), whose backward reads it
    m = tiny_model(family)
    report = K.patch_model(m)
    assert report.parts["lean_recompute"] == f"stock: {family} normalises the MLP output, so backward needs it"
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = _down_projections(monkeypatch)
    ids = torch.randint(3, 300, (1, 9), device=next(m.parameters()).device)
    m(input_ids=ids, labels=ids).loss.backward()
    assert counts == {"forward": 4, "recompute": 0}
