import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sftop.kernels.rope import apply_rope

from _kernel_testutil import DEVICE, rel_err


def _cos_sin(position_ids, dim, base=10000.0):
    # HF's default rotary: freqs duplicated over both halves, computed in fp32 from position ids
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].double() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize(
    "b,hq,hk,t,d",
    [(2, 4, 2, 9, 16), (1, 3, 3, 17, 64), (3, 6, 1, 5, 10)],
)
@pytest.mark.parametrize("packed", [False, True])
def test_rope_matches_hf(case, poison, b, hq, hk, t, d, packed):
    device, dtype, tol = case
    if packed:
        # two documents per row: position ids restart at 0 mid-row
        cut = t // 2
        pos = torch.cat([torch.arange(cut), torch.arange(t - cut)]).expand(b, t)
    else:
        pos = torch.arange(t).expand(b, t) + torch.arange(b)[:, None] * 3
    cos, sin = _cos_sin(pos, d)
    # the projection layout: [B,T,H,D] memory viewed as [B,H,T,D]
    q = torch.randn(b, t, hq, d, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, t, hk, d, dtype=torch.float64).transpose(1, 2)
    gq = torch.randn(b, hq, t, d, dtype=torch.float64)
    gk = torch.randn(b, hk, t, d, dtype=torch.float64)

    qd = q.to(device, dtype).requires_grad_()
    kd = k.to(device, dtype).requires_grad_()
    qo, ko = apply_rope(qd, kd, cos.to(device, dtype), sin.to(device, dtype))
    dq, dk = torch.autograd.grad((qo, ko), (qd, kd), (gq.to(device, dtype), gk.to(device, dtype)))

    qr = qd.detach().double().cpu().requires_grad_()
    kr = kd.detach().double().cpu().requires_grad_()
    qro, kro = apply_rotary_pos_emb(qr, kr, cos.to(dtype).double(), sin.to(dtype).double())
    dqr, dkr = torch.autograd.grad((qro, kro), (qr, kr), (gq, gk))

    assert qo.shape == q.shape and ko.shape == k.shape
    for out, ref in ((qo, qro), (ko, kro), (dq, dqr), (dk, dkr)):
        assert rel_err(out, ref) < tol


def test_rope_broadcast_cos_and_unsqueeze_dim_2():
    b, h, t, d = 2, 3, 6, 8
    cos, sin = _cos_sin(torch.arange(t)[None], d)
    cos, sin = cos.float().to(DEVICE), sin.float().to(DEVICE)
    q, k = torch.randn(b, t, h, d, device=DEVICE), torch.randn(b, t, h, d, device=DEVICE)
    qo, ko = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    assert rel_err(qo, qr) < 1e-6 and rel_err(ko, kr) < 1e-6
