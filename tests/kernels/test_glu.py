import pytest
import torch

from sftop.kernels.glu import geglu, swiglu

from _kernel_testutil import DEVICE, rel_err


def _ref(g, u, kind):
    if kind == "swiglu":
        return torch.nn.functional.silu(g) * u
    return torch.nn.functional.gelu(g, approximate="tanh") * u


@pytest.mark.parametrize("shape", [(2, 5, 96), (7, 33), (3, 1, 1001)])
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu_matches_reference(case, poison, shape, kind):
    device, dtype, tol = case
    fn = swiglu if kind == "swiglu" else geglu
    g = (torch.randn(shape, dtype=torch.float64) * 3).to(device, dtype).requires_grad_()
    u = torch.randn(shape, dtype=torch.float64).to(device, dtype).requires_grad_()
    dh = torch.randn(shape, dtype=torch.float64).to(device, dtype)

    h = fn(g, u)
    dg, du = torch.autograd.grad(h, [g, u], dh)

    gr = g.detach().double().cpu().requires_grad_()
    ur = u.detach().double().cpu().requires_grad_()
    hr = _ref(gr, ur, kind)
    dgr, dur = torch.autograd.grad(hr, [gr, ur], dh.double().cpu())

    assert h.dtype == dtype
    assert rel_err(h, hr) < tol
    assert rel_err(dg, dgr) < tol
    assert rel_err(du, dur) < tol


def test_glu_float32_matches_torch_float32():
    g, u = torch.randn(4, 77, device=DEVICE) * 4, torch.randn(4, 77, device=DEVICE)
    assert rel_err(swiglu(g, u), torch.nn.functional.silu(g) * u) < 1e-6
    assert rel_err(geglu(g, u), torch.nn.functional.gelu(g, approximate="tanh") * u) < 1e-6
