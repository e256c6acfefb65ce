"""Lean recomputation (sftop/kernels/recompute.py, patch part lean_recompute): under gradient
checkpointing the fused LoRA MLP skips its down projection when its layer is recomputed, and the
gradients stay those of the stock model."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import sftop.kernels as K
import sftop.kernels.lora_mlp as lm
from sftop.kernels.recompute import checkpoint_marking_recompute, keep_for_recompute, kept_from_first_run, recomputing

from _kernel_testutil import rel_err
from _tiny_models import tiny_config, tiny_model, twin


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


def test_the_recomputation_reads_what_the_first_run_kept_in_order():
    lin = torch.nn.Linear(8, 8)
    first_run, recomputed = [], []

    def layer(x):
        if recomputing():
            recomputed.extend([kept_from_first_run(), kept_from_first_run(), kept_from_first_run()])
        else:
            a, b = torch.randn(3), torch.randn(2)
            keep_for_recompute(a)
            keep_for_recompute(b)
            first_run.extend([a, b])
        return torch.sigmoid(torch.tanh(lin(x)))

    x = torch.randn(3, 8, requires_grad=True)
    out = checkpoint_marking_recompute(layer, x, use_reentrant=False)
    out2 = checkpoint_marking_recompute(layer, x, use_reentrant=False)  # a second layer keeps its own
    (out.sum() + 0 * out2.sum()).backward(inputs=[x])
    # both layers recomputed; each got back exactly its own tensors, then None
    assert len(recomputed) == 6
    firsts = {id(t) for t in first_run}
    assert recomputed[2] is None and recomputed[5] is None
    assert {id(recomputed[0]), id(recomputed[1]), id(recomputed[3]), id(recomputed[4])} == firsts
    pairs = [(recomputed[0], recomputed[1]), (recomputed[3], recomputed[4])]
    assert sorted([(id(a), id(b)) for a, b in pairs]) == sorted(
        [(id(first_run[0]), id(first_run[1])), (id(first_run[2]), id(first_run[3]))]
    )
    # outside a checkpointed layer keeping does nothing and nothing comes back
    keep_for_recompute(torch.ones(1))
    assert kept_from_first_run() is None


def _down_projections(monkeypatch):
    """Count the down projections lora_mlp runs (whole, or a checkpointed run's token chunks),
    split by whether they ran in a recomputation."""
    counts = {"forward": 0, "recompute": 0}
    real, real_chunk = lm._project, lm._down_chunk

    def counting(inp, base, a, b, scale):
        if base.in_features > base.out_features:  # down: intermediate -> hidden
            counts["recompute" if recomputing() else "forward"] += 1
        return real(inp, base, a, b, scale)

    def counting_chunk(*args):
        counts["recompute" if recomputing() else "forward"] += 1
        return real_chunk(*args)

    monkeypatch.setattr(lm, "_project", counting)
    monkeypatch.setattr(lm, "_down_chunk", counting_chunk)
    return counts


@pytest.mark.parametrize("chunked", [False, True], ids=["gate-up-saved", "SFTOP_CHUNKED_MLP"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_recomputed_layers_skip_the_down_projection_with_stock_gradients(monkeypatch, poison, family, chunked):
    if chunked:  # gate and up rebuilt in backward, in two token chunks of the 2 x 11 tokens
        monkeypatch.setenv("SFTOP_CHUNKED_MLP", "1")
        monkeypatch.setattr(lm, "REGATE_CHUNK_BYTES", 12 * tiny_config(family).intermediate_size * 4)
    stock = tiny_model(family)
    fused = twin(stock)
    report = K.patch_model(fused)
    assert report.parts["lean_recompute"] == "fused"
    for m in (stock, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = _down_projections(monkeypatch)
    activations = {"forward": 0, "recompute": 0}
    real_glu = lm.glu_forward

    def counting_glu(*a):
        activations["recompute" if recomputing() else "forward"] += 1
        return real_glu(*a)

    monkeypatch.setattr(lm, "glu_forward", counting_glu)
    ids = torch.randint(3, 300, (2, 11), device=next(stock.parameters()).device)
    losses = []
    for m in (stock, fused):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    # two layers: the forward pass projects twice (each in two chunks when chunked), the two
    # recomputations not at all; they take the down adapter's rank-r product from the first run,
    # so they skip the activation too
    per_layer = 2 if chunked else 1
    assert counts == {"forward": 2 * per_layer, "recompute": 0}
    assert activations == {"forward": 2 * per_layer, "recompute": 0}
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


def test_qlora_recomputation_skips_the_down_dequantisation_with_stock_gradients(monkeypatch):
    # bitsandbytes' NF4 runs on the CPU too; fp32 compute, so patched and stock agree to rounding
    from transformers import BitsAndBytesConfig

    import sftop.kernels.nf4 as nf4

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    stock = tiny_model("llama", quant=q)
    fused = tiny_model("llama", quant=q)
    assert K.patch_model(fused).parts["lean_recompute"] == "fused"
    downs = {id(m.base_layer.weight) for name, m in fused.named_modules() if name.endswith("mlp.down_proj")}
    assert len(downs) == 2
    down_dequantised = []
    real = nf4.dequantize_4bit_weight
    monkeypatch.setattr(
        lm, "dequantize_4bit_weight", lambda w, dt: (id(w) in downs and down_dequantised.append(1)) or real(w, dt)
    )
    counts = _down_projections(monkeypatch)
    ids = torch.randint(3, 300, (2, 11), device=next(stock.parameters()).device)
    grads = []
    for m in (stock, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert counts == {"forward": 2, "recompute": 0}
    # per layer: once in the forward pass, once in backward, never in the recomputation
    assert len(down_dequantised) == 2 * 2
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-4, n
