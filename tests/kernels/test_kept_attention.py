"""Attention that keeps its output for the checkpoint recomputation (sftop/kernels/kept_attention.py).

CPU: the Function with PyTorch's CPU flash kernels against SDPA in float64 (forward and backward,
GQA, odd lengths), and inside checkpointed layers: the recomputation runs no attention kernel and
the gradients are plain checkpointing's.  The hand-over to host memory is the checkpoint's offload
hooks' job (checkpoint_offload.py); here a stand-in moves the tensor through a copy.  GPU: the
same with cuDNN and the real offload, in a whole patched model.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sftop.kernels as K
import sftop.kernels.kept_attention as ka
from sftop.kernels.recompute import checkpoint_marking_recompute

from _kernel_testutil import rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sdpa(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True, scale=scale).transpose(1, 2)


def _qkv(b, hq, hkv, t, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # HF's layout: [B, T, H, D] in memory, seen as [B, H, T, D]
    mk = lambda h: torch.randn(b, t, h, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


@pytest.mark.parametrize("b,hq,hkv,t,d", [(1, 4, 4, 7, 16), (2, 8, 2, 13, 8), (3, 6, 3, 33, 32)])
def test_function_matches_sdpa(b, hq, hkv, t, d):
    q, k, v = _qkv(b, hq, hkv, t, d)
    scale = 0.3
    out = ka.kept_attention(q, k, v, scale)
    ref = _sdpa(q, k, v, scale)
    assert out.shape == (b, t, hq, d) and out.is_contiguous()
    assert rel_err(out, ref) < 1e-10
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


class _CopyingHooks:
    """Stands in for the offload hooks: pack copies the tensor away, unpack copies it back."""

    def __init__(self):
        self.packed = 0

    def pack(self, t):
        self.packed += 1
        return t.detach().clone()

    def unpack(self, h):
        return h.clone()


def _layer(q_proj, kv_proj, o_proj):
    def layer(x):
        b, t, _ = x.shape
        q = q_proj(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = kv_proj(x).view(b, t, 2, 2, 8).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if ka.applies(torch.nn.Identity(), q, k, None, 0.0, {}):
            out = ka.kept_attention(q, k, v, None)
        else:
            out = _sdpa(q, k, v, None)
        return torch.tanh(o_proj(out.reshape(b, t, -1)))
    return layer


def test_recomputation_reuses_the_kept_output_with_plain_checkpointing_gradients(monkeypatch):
    torch.manual_seed(0)
    projs = [torch.nn.Linear(24, 32).double(), torch.nn.Linear(24, 32).double(), torch.nn.Linear(32, 24).double()]
    layer = _layer(*projs)
    params = [p for m in projs for p in m.parameters()]
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    calls = {"forward": 0}
    real = ka._forward

    def counting(*a):
        calls["forward"] += 1
        return real(*a)

    monkeypatch.setattr(ka, "_forward", counting)
    hooks = _CopyingHooks()
    out = checkpoint_marking_recompute(layer, x, use_reentrant=False, _offload=hooks)
    out2 = checkpoint_marking_recompute(layer, out, use_reentrant=False, _offload=hooks)
    assert calls["forward"] == 2 and hooks.packed == 2
    out2.square().sum().backward()
    # both recomputations took the first runs' outputs back: no third or fourth kernel call
    assert calls["forward"] == 2
    got = [x.grad] + [p.grad for p in params]

    for t in [x, *params]:
        t.grad = None
    monkeypatch.setattr(ka, "_forward", real)
    ref = checkpoint(layer, checkpoint(layer, x, use_reentrant=False), use_reentrant=False)
    ref.square().sum().backward()
    want = [x.grad] + [p.grad for p in params]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_without_offload_nothing_is_kept_and_attention_is_recomputed(monkeypatch):
    torch.manual_seed(0)
    layer = _layer(torch.nn.Linear(24, 32).double(), torch.nn.Linear(24, 32).double(), torch.nn.Linear(32, 24).double())
    x = torch.randn(1, 5, 24, dtype=torch.float64, requires_grad=True)
    calls = []
    monkeypatch.setattr(ka, "_forward", lambda *a: calls.append(1))  # must not be reached
    checkpoint_marking_recompute(layer, x, use_reentrant=False).sum().backward()
    assert calls == []  # SDPA ran, in both runs


@pytest.mark.parametrize("kw,mask,dropout", [({"is_causal": False}, None, 0.0), ({}, torch.ones(1), 0.0),
                                            ({}, None, 0.1), ({"softcap": 30.0}, None, 0.0),
                                            ({"sliding_window": 8}, None, 0.0)])
def test_only_plain_causal_attention_takes_the_path(kw, mask, dropout):
    q, k, _v = _qkv(1, 4, 2, 5, 8)
    seen = []

    def layer(x):
        seen.append(ka.applies(torch.nn.Identity(), q, k, mask, dropout, kw))
        return torch.sin(x)  # saves its input: the checkpoint recomputes

    x = torch.randn(3, requires_grad=True)
    checkpoint_marking_recompute(layer, x, use_reentrant=False, _offload=_CopyingHooks()).sum().backward()
    assert seen == [False, False]
    checkpoint_marking_recompute(
        lambda x: seen.append(ka.applies(torch.nn.Identity(), q, k, None, 0.0, {})) or torch.sin(x),
        x, use_reentrant=False, _offload=_CopyingHooks()).sum().backward()
    assert seen[2:] == [True, True]


@pytest.mark.gpu
@needs_gpu
def test_patched_model_with_offload_skips_the_recomputed_attention_kernel(monkeypatch):
    from _tiny_models import bf16_lora_llama

    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")
    calls = []
    real = ka._forward
    monkeypatch.setattr(ka, "_forward", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 1000, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    grads, counts = [], []
    for offload in (True, False):
        m = bf16_lora_llama(hidden=1024, layers=3)
        assert K.patch_model(m).parts["attention"] == "fused"
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
        calls.clear()
        m(input_ids=ids, labels=ids).loss.backward()
        counts.append(len(calls))
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    # with offload: the three layers' first runs, no recomputation; without: SDPA throughout
    assert counts == [3, 0], counts
    for n, g in grads[1].items():
        assert g.abs().sum() > 0, n
        assert rel_err(grads[0][n], g) < 1e-2, (n, rel_err(grads[0][n], g))
