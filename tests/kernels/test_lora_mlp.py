import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sftop.kernels as K
from sftop.kernels.glu import GEGLU, SWIGLU
import sftop.kernels.lora_mlp as lm
from sftop.kernels.lora_mlp import LoRAMLPFunction

from _kernel_testutil import rel_err
from _tiny_models import tiny_model, twin


def _ref(x, wg, wu, wd, ag, bg, au, bu, ad, bd, s, kind):
    def proj(i, w, a, b, sc):
        return i @ w.t() + sc * (i @ a.t()) @ b.t()

    act = F.silu if kind == SWIGLU else (lambda t: F.gelu(t, approximate="tanh"))
    h = act(proj(x, wg, ag, bg, s[0])) * proj(x, wu, au, bu, s[1])
    return proj(h, wd, ad, bd, s[2])


def _mlp_case(device, dtype, n, hid, inter, r, shape=None):
    """Frozen gate/up/down bases, the six adapter tensors and an input of `shape` (default one row of n)."""
    f64 = dict(dtype=torch.float64)
    base = [
        nn.Linear(i, o, bias=False).to(device, dtype).requires_grad_(False)
        for i, o in ((hid, inter), (hid, inter), (inter, hid))
    ]
    # adapters stay fp32 (as PEFT keeps them) whatever the compute dtype
    shapes = [(r, hid), (inter, r), (r, hid), (inter, r), (r, inter), (hid, r)]
    lora = [(torch.randn(s, **f64) / 3).float().to(device).requires_grad_() for s in shapes]
    x = torch.randn(shape or (1, n, hid), **f64).to(device, dtype).requires_grad_()
    return base, lora, x


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["whole", "dh-in-chunks"])
@pytest.mark.parametrize("kind", [SWIGLU, GEGLU])
@pytest.mark.parametrize("n,hid,inter,r", [(7, 24, 40, 4), (2 * 9, 32, 72, 3)])
def test_lora_mlp_function_matches_reference(case, poison, monkeypatch, kind, n, hid, inter, r, chunk_rows):
    device, dtype, tol = case
    if chunk_rows:  # backward builds dh at most 5 token rows at a time (7 -> 4+3, 18 -> 5+5+5+3)
        monkeypatch.setattr(lm, "DH_CHUNK_BYTES", chunk_rows * inter * dtype.itemsize)
        assert 1 < -(-n // lm._dh_chunk_rows(n, inter, dtype.itemsize))
    base, lora, x = _mlp_case(device, dtype, n, hid, inter, r, shape=(1, n, hid) if n % 2 else (2, n // 2, hid))
    scales = (0.5, 2.0, 1.25)
    out = LoRAMLPFunction.apply(x, *lora, tuple(base), scales, kind, dtype)
    dout = torch.randn(out.shape, dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(out, [x, *lora], dout)

    xr = x.detach().double().cpu().requires_grad_()
    lr = [t.detach().double().cpu().requires_grad_() for t in lora]
    wr = [b.weight.detach().double().cpu() for b in base]
    ref = _ref(xr, *wr, *lr, scales, kind)
    refs = torch.autograd.grad(ref, [xr, *lr], dout.double().cpu())

    bounds = [tol] + [tol if dtype == torch.float32 else 3e-2] * len(refs)
    if dtype == torch.bfloat16:
        # At these tiny widths bf16's own rounding of gate/up/h sometimes passes 1e-2 by itself
        # (one draw in ~15 for the plain PyTorch bf16 MLP): a bound is also met by staying within
        # 3x the error of that PyTorch bf16 computation on the same inputs.
        xs = x.detach().cpu().requires_grad_()
        ls = [t.detach().cpu().bfloat16().requires_grad_() for t in lora]
        stock = _ref(xs, *[b.weight.detach().cpu() for b in base], *ls, scales, kind)
        stocks = torch.autograd.grad(stock, [xs, *ls], dout.cpu())
        bounds = [max(b, 3 * rel_err(st, want)) for b, st, want in zip(bounds, (stock, *stocks), (ref, *refs))]
    assert out.dtype == dtype
    assert rel_err(out, ref) < bounds[0]
    for got, want, p, bound in zip(grads, refs, [x, *lora], bounds[1:]):
        assert got.dtype == p.dtype
        assert rel_err(got, want) < bound


def test_patched_mlp_takes_the_one_function_path(monkeypatch):
    import sftop.kernels.lora_mlp as lm

    calls = []
    real = lm.LoRAMLPFunction.apply
    monkeypatch.setattr(lm.LoRAMLPFunction, "apply", lambda *a: calls.append(1) or real(*a))
    m = tiny_model("llama")
    K.patch_model(m)
    ids = torch.randint(3, 300, (1, 9), device=next(m.parameters()).device)
    m(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # one per layer


def test_lora_mlp_path_respects_disabled_adapters_and_dropout():
    stock = tiny_model("gemma2")
    fused = twin(stock)
    K.patch_model(fused)
    ids = torch.randint(3, 300, (2, 7), device=next(stock.parameters()).device)
    with stock.disable_adapter(), fused.disable_adapter():
        assert rel_err(fused(input_ids=ids, labels=ids).loss, stock(input_ids=ids, labels=ids).loss) < 1e-5
    # dropout > 0 keeps PEFT's layers; the activation is still fused and the result still exact (eval)
    d = tiny_model("llama", lora_dropout=0.2)
    d_fused = twin(d)
    K.patch_model(d_fused)
    assert all(
        mod.__dict__.get("_sftop_lora_adapter", None) is None
        for mod in d_fused.modules()
        if type(mod).__name__ == "LlamaMLP"
    )
    d.eval()
    d_fused.eval()
    assert rel_err(d_fused(input_ids=ids, labels=ids).loss, d(input_ids=ids, labels=ids).loss) < 1e-5


@pytest.mark.parametrize("kept", [True, False], ids=["h-product-kept", "h-product-rebuilt"])
@pytest.mark.parametrize("kind", [SWIGLU, GEGLU])
@pytest.mark.parametrize("n,hid,inter,r,chunk_rows", [(13, 24, 40, 4, 5), (9, 32, 72, 3, 9), (19, 16, 48, 2, 4)])
def test_checkpointed_mlp_rebuilds_gate_and_up_in_chunks_with_reference_gradients(
    poison, monkeypatch, gate_up_chunks, kind, n, hid, inter, r, chunk_rows, kept
):
    """Under checkpointing neither gate nor up is saved: the first run and backward go a token
    chunk at a time (13 rows -> 5+5+3), the recomputation computes no projection; loss and every
    gradient are those of the float64 reference, through torch's checkpoint and its recomputation."""
    from sftop.kernels import recompute

    device, dtype = ("cuda" if torch.cuda.is_available() else "cpu"), torch.float32
    monkeypatch.setenv("SFTOP_CHUNKED_MLP", "1")
    monkeypatch.setattr(lm, "REGATE_CHUNK_BYTES", chunk_rows * inter * dtype.itemsize)
    assert lm._regate_rows(n, inter, dtype.itemsize) == chunk_rows
    base, lora, x = _mlp_case(device, dtype, n, hid, inter, r)
    scales = (0.5, 2.0, 1.25) if kind == SWIGLU else (1.5, 1.5, 0.75)
    if not kept:  # a first run that kept nothing: the recomputation rebuilds h @ A_down^T itself
        monkeypatch.setattr(recompute, "keep_for_recompute", lambda tensor, offload=False: None)

    def layer(x, *lora):
        out = LoRAMLPFunction.apply(x, *lora, tuple(base), scales, kind, dtype, recompute.current_layer_run())
        return out * 1.5 + x  # as a decoder layer's residual: nothing reads the output in backward

    out = recompute.checkpoint_marking_recompute(layer, x, *lora, use_reentrant=False)
    dout = torch.randn(out.shape, dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(out, [x, *lora], dout)
    chunks = -(-n // chunk_rows)
    # the first run: every chunk; the recomputation: none, or every chunk for h @ A_down^T; backward: every chunk
    assert gate_up_chunks == {"first run or backward": chunks + chunks, "recomputation": 0 if kept else chunks}

    xr = x.detach().double().requires_grad_()
    lr = [t.detach().double().requires_grad_() for t in lora]
    ref = _ref(xr, *[b.weight.detach().double() for b in base], *lr, scales, kind) * 1.5 + xr
    refs = torch.autograd.grad(ref, [xr, *lr], dout.double())
    tol = 1e-5 if device == "cpu" else 2e-3  # TF32 GEMMs on a GPU
    assert rel_err(out, ref) < tol
    for got, want, p in zip(grads, refs, [x, *lora]):
        assert got.dtype == p.dtype and got.shape == p.shape
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("switch", ["1", None])
def test_checkpointed_mlp_saves_no_intermediate_sized_tensor(monkeypatch, switch):
    """What a checkpointed layer's MLP saves for backward with SFTOP_CHUNKED_MLP=1: its input and
    rank-r products, never a [tokens, intermediate] tensor (the Function without a layer run, or
    with the switch unset, saves gate and up)."""
    from sftop.kernels.recompute import LayerRun

    if switch:
        monkeypatch.setenv("SFTOP_CHUNKED_MLP", switch)
    else:
        monkeypatch.delenv("SFTOP_CHUNKED_MLP", raising=False)

    n, hid, inter, r = 12, 16, 64, 2
    base, lora, x = _mlp_case("cuda" if torch.cuda.is_available() else "cpu", torch.float32, n, hid, inter, r)
    sizes = {}
    for name, run in (("whole", None), ("checkpointed", LayerRun(False))):
        seen: list = []
        sizes[name] = seen
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, seen=seen: seen.append(tuple(t.shape)) or t, lambda t: t
        ):
            LoRAMLPFunction.apply(x, *lora, tuple(base), (1.0, 1.0, 1.0), SWIGLU, torch.float32, run)
    assert sizes["whole"].count((n, inter)) == 2
    if switch:
        assert (n, inter) not in sizes["checkpointed"] and (n, hid) in sizes["checkpointed"]
    else:
        assert sizes["checkpointed"] == sizes["whole"]
