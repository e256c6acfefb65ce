"""The fused linear log-prob kernel against a float64 reference, forward and backward."""

import pytest
import torch

from sftop.kernels.fused_linear_logprob import fused_linear_logprob

from _kernel_testutil import DEVICE, rel_err


def _ref(h, w, y, softcap):
    logits = (h @ w.t()).double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp_all = torch.log_softmax(logits, dim=-1)
    counted = y != -100
    logp = logp_all.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * counted
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1) * counted
    mean = logits.mean(-1) * counted
    top1 = (logits.argmax(-1) == y) & counted
    return logp, entropy, mean, top1


@pytest.mark.parametrize("n,hid,vocab", [(13, 32, 300), (29, 24, 257)])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 300 * 5])
def test_logprob_matches_float64(case, poison, n, hid, vocab, softcap, train_w, chunk_bytes):
    device, dtype, tol = case
    h = torch.randn(n, hid, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hid, dtype=torch.float64) / hid**0.5 * 3).to(device, dtype).requires_grad_(train_w)
    y = torch.randint(0, vocab, (n,))
    y[torch.rand(n) < 0.3] = -100
    y[0] = vocab - 1  # the last class exercises the block tail
    logp, ent, mean, top1 = fused_linear_logprob(
        h, w, y.to(device), softcap=softcap, chunk_bytes=chunk_bytes, stats=True
    )
    # a different upstream gradient per token, as DPO's loss gives chosen and rejected rows
    g = torch.randn(n, dtype=torch.float64)
    grads = torch.autograd.grad((logp * g.to(device, torch.float32)).sum(), [h, w] if train_w else [h])

    hr = h.detach().double().cpu().requires_grad_()
    wr = w.detach().double().cpu().requires_grad_(train_w)
    rlogp, rent, rmean, rtop1 = _ref(hr, wr, y, softcap)
    refs = torch.autograd.grad((rlogp * g).sum(), [hr, wr] if train_w else [hr])

    assert logp.dtype == torch.float32
    assert rel_err(logp, rlogp) < tol
    assert rel_err(ent, rent) < tol
    assert rel_err(mean, rmean) < max(tol, 1e-5)
    if dtype == torch.float32:  # bf16 rounding can create ties at the top
        assert torch.equal(top1.cpu(), rtop1)
    assert not ent.requires_grad and not mean.requires_grad
    # bf16: the unit dX comes from the 16-bit gradient buffer (as in the fused cross-entropy), and
    # a random upstream gradient per row lets the largest rows dominate that rounding (seen: 1.1e-2)
    gtol = 2 * tol if dtype == torch.bfloat16 else tol
    for out, ref in zip(grads, refs):
        assert out.dtype == dtype
        assert rel_err(out, ref) < gtol


def test_logprob_3d_no_grad_and_ignored_rows():
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 16, device=DEVICE)
    y = torch.full((2, 5), -100, device=DEVICE)
    y[1, 2] = 7
    with torch.no_grad():  # the reference forward: no gradient buffers, same values
        ref_logp = fused_linear_logprob(h, w, y)
    logp = fused_linear_logprob(h, w, y)
    assert logp.shape == (2, 5) and torch.equal(ref_logp, logp.detach())
    assert torch.count_nonzero(logp.detach()) == 1
    expected = torch.log_softmax(h[1, 2] @ w.t(), -1)[7]
    assert rel_err(logp[1, 2], expected) < 1e-6
    logp.sum().backward()
    ref = torch.autograd.grad(torch.log_softmax(h[1, 2:3] @ w.t(), -1)[0, 7], h)[0]
    assert rel_err(h.grad, ref) < 1e-5
