"""LoRAQKVFunction / LoRALinearFunction against a float64 reference, and the attention_lora patch."""

import pytest
import torch
from torch import nn

import sftop.kernels as K
import sftop.kernels.lora_linear as ll

from _kernel_testutil import rel_err
from _tiny_models import DEVICE, FAMILIES, tiny_model, twin
from test_patch_models import _batch, _loss_and_grads


def _ref(x, weights, biases, lora, scales):
    outs = []
    for i, (w, bias, s) in enumerate(zip(weights, biases, scales)):
        a, b = lora[2 * i], lora[2 * i + 1]
        y = x @ w.t() + s * (x @ a.t()) @ b.t()
        outs.append(y if bias is None else y + bias)
    return outs


@pytest.mark.parametrize("n_proj", [1, 3])
@pytest.mark.parametrize("scales", [(0.5, 0.5, 0.5), (0.5, 2.0, 1.25)])
@pytest.mark.parametrize("bias", [False, True])
def test_function_matches_reference(case, poison, n_proj, scales, bias):
    device, dtype, tol = case
    f64 = dict(dtype=torch.float64)
    hid, outs, r = 24, (40, 16, 16)[:n_proj], 3
    scales = scales[:n_proj]
    base = [nn.Linear(hid, o, bias=bias).to(device, dtype).requires_grad_(False) for o in outs]
    # adapters stay fp32 (as PEFT keeps them) whatever the compute dtype
    lora = []
    for o in outs:
        lora += [
            (torch.randn(r, hid, **f64) / 3).float().to(device).requires_grad_(),
            (torch.randn(o, r, **f64) / 3).float().to(device).requires_grad_(),
        ]
    x = torch.randn(2, 7, hid, **f64).to(device, dtype).requires_grad_()
    fn = ll.LoRAQKVFunction if n_proj > 1 else ll.LoRALinearFunction
    got = fn.apply(x, tuple(base), scales, dtype, dtype, None, *lora)
    got = got if isinstance(got, tuple) else (got,)
    douts = [torch.randn(g.shape, **f64).to(device, dtype) for g in got]
    grads = torch.autograd.grad(got, [x, *lora], douts)

    xr = x.detach().double().cpu().requires_grad_()
    lr = [t.detach().double().cpu().requires_grad_() for t in lora]
    ref = _ref(
        xr,
        [b.weight.double().cpu() for b in base],
        [None if b.bias is None else b.bias.double().cpu() for b in base],
        lr,
        scales,
    )
    refs = torch.autograd.grad(ref, [xr, *lr], [d.double().cpu() for d in douts])

    for g, want in zip(got, ref):
        assert g.dtype == dtype
        assert rel_err(g, want) < tol
    for g, want, p in zip(grads, refs, [x, *lora]):
        assert g.dtype == p.dtype
        assert rel_err(g, want) < (tol if dtype == torch.float32 else 3e-2)


def test_no_input_grad_still_gives_adapter_grads():
    hid = 16
    base = [nn.Linear(hid, 8, bias=False).requires_grad_(False) for _ in range(3)]
    lora = []
    for _ in range(3):
        lora += [torch.randn(2, hid, requires_grad=True), torch.randn(8, 2, requires_grad=True)]
    x = torch.randn(5, hid)
    outs = ll.LoRAQKVFunction.apply(x, tuple(base), (2.0, 2.0, 2.0), torch.float32, torch.float32, None, *lora)
    sum(o.square().sum() for o in outs).backward()
    xr = x.double()
    lr = [t.detach().double().requires_grad_() for t in lora]
    sum(o.square().sum() for o in _ref(xr, [b.weight.double() for b in base], [None] * 3, lr, (2.0,) * 3)).backward()
    for p, q in zip(lora, lr):
        assert rel_err(p.grad, q.grad) < 1e-5


def _count_calls(monkeypatch):
    calls = {"qkv": 0, "linear": 0}
    for key, cls in (("qkv", ll.LoRAQKVFunction), ("linear", ll.LoRALinearFunction)):
        real = cls.apply

        def counted(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)

        monkeypatch.setattr(cls, "apply", counted)
    return calls


@pytest.mark.parametrize("checkpointed", [False, True])
def test_patched_attention_takes_one_qkv_function_per_layer(monkeypatch, checkpointed):
    calls = _count_calls(monkeypatch)
    m = tiny_model("llama")
    assert K.patch_model(m).parts["attention_lora"] == "fused"
    m.train()
    if checkpointed:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m(**_batch("padded", 1)).loss.backward()
    rounds = 2 if checkpointed else 1  # recomputation runs each layer's forward again
    # 2 layers: one q/k/v Function each; o_proj is the only other single LoRA linear (the MLP is
    # its own Function)
    assert calls == {"qkv": 2 * rounds, "linear": 2 * rounds}


def test_qkv_reuse_never_hands_out_an_output_for_another_input():
    m = tiny_model("llama")
    stock = twin(m)
    K.patch_model(m)
    attn = m.get_base_model().model.layers[0].self_attn
    s_attn = stock.get_base_model().model.layers[0].self_attn
    x, y = torch.randn(2, 5, 64, device=DEVICE), torch.randn(2, 5, 64, device=DEVICE)
    q = attn.q_proj(x)  # leaves k and v of x pending
    k_y = attn.k_proj(y)  # another input: computed afresh, not x's pending k
    assert rel_err(q, s_attn.q_proj(x)) < 1e-6
    assert rel_err(k_y, s_attn.k_proj(y)) < 1e-6
    assert rel_err(attn.v_proj(y), s_attn.v_proj(y)) < 1e-6  # y's pending v
    assert rel_err(attn.k_proj(x), s_attn.k_proj(x)) < 1e-6
    assert rel_err(attn.v_proj(x), s_attn.v_proj(x)) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_and_o_under_disabled_adapter_match_stock(family):
    stock = tiny_model(family)
    fused = twin(stock)
    K.patch_model(fused)
    batch = _batch("padded", 4)
    with stock.disable_adapter(), fused.disable_adapter():
        assert rel_err(fused(**batch).loss, stock(**batch).loss) < 1e-5


def test_attention_lora_stays_stock_when_lora_must():
    m = tiny_model("llama", lora_dropout=0.1)
    assert "LoRA dropout > 0" in K.patch_model(m).parts["attention_lora"]
    m = tiny_model("llama", target_modules=["q_proj", "v_proj", "o_proj"])
    report = K.patch_model(m)
    assert report.parts["attention_lora"].startswith("stock: q/k/v are not all PEFT LoRA layers")
    assert report.parts["lora"] == "fused"


def _max_grad_err(planted, monkeypatch, family="qwen2"):
    stock = tiny_model(family)
    fused = twin(stock)
    K.patch_model(fused)
    if planted is not None:
        real = ll._backward

        def wrong(ctx, douts):
            grads = list(real(ctx, douts))
            if grads[planted] is not None:  # layer 0 needs no dX: the embeddings are frozen
                grads[planted] = grads[planted] * 1.001  # a 0.1 % error in one of the Function's gradients
            return tuple(grads)

        monkeypatch.setattr(ll, "_backward", wrong)
    batch = _batch("packed", 8)
    _, s_grads = _loss_and_grads(stock, batch)
    _, f_grads = _loss_and_grads(fused, batch)
    return max(rel_err(f_grads[n], g) for n, g in s_grads.items())


@pytest.mark.parametrize("planted", [0, 6, 7])  # dX, first A gradient, first B gradient
def test_whole_model_check_catches_a_planted_backward_error(monkeypatch, planted):
    # the same 1e-4 bound test_patch_models uses must reject a 0.1 % error, while the
    # unmodified Function passes it (qwen2: q/k/v carry a base bias, so that path is included)
    assert _max_grad_err(planted, monkeypatch) > 1e-4
    monkeypatch.undo()
    assert _max_grad_err(None, monkeypatch) < 1e-4
