import pytest
import torch

from sftop.kernels.rms_norm import rms_norm

from _kernel_testutil import DEVICE, rel_err


def _ref(x, w, eps, gemma):
    x64, w64 = x.double(), w.double()
    n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return n * (1 + w64) if gemma else n * w64


@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 33), (2, 4, 3, 130), (1, 1000)])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("train_w", [False, True])
def test_rms_norm_matches_reference(case, poison, shape, gemma, train_w):
    device, dtype, tol = case
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(shape[-1], dtype=torch.float64) * 0.5 + (0 if gemma else 1)).to(device, dtype)
    w.requires_grad_(train_w)
    dy = torch.randn(shape, dtype=torch.float64).to(device, dtype)

    y = rms_norm(x, w, 1e-6, gemma)
    grads = torch.autograd.grad(y, [x, w] if train_w else [x], dy)

    xr = x.detach().double().cpu().requires_grad_()
    wr = w.detach().double().cpu().requires_grad_(train_w)
    yr = _ref(xr, wr, 1e-6, gemma)
    refs = torch.autograd.grad(yr, [xr, wr] if train_w else [xr], dy.double().cpu())

    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, yr) < tol
    for g, r in zip(grads, refs):
        assert rel_err(g, r) < tol


def test_rms_norm_matches_hf_llama_and_gemma_forms():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(4, 9, 48, device=DEVICE) * 2
    for mod, gemma in ((LlamaRMSNorm(48, eps=1e-5), False), (Gemma2RMSNorm(48, eps=1e-5), True)):
        mod.to(DEVICE)
        with torch.no_grad():
            mod.weight.copy_(torch.randn(48) * 0.3)
        assert rel_err(rms_norm(x, mod.weight, 1e-5, gemma), mod(x)) < 1e-6


def test_rms_norm_nan_input_propagates():
    x = torch.randn(2, 16, device=DEVICE)
    x[1, 3] = float("nan")
    y = rms_norm(x, torch.ones(16, device=DEVICE))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
