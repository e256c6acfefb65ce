import pytest
import torch
import torch.nn.functional as F

from sftop.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

from _kernel_testutil import DEVICE, rel_err


def _ref(h, w, y, num_items, softcap):
    logits = (h @ w.t()).double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items is None:
        return F.cross_entropy(logits, y, ignore_index=-100)
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum") / num_items


@pytest.mark.parametrize("n,hid,vocab", [(13, 32, 300), (40, 24, 257), (7, 64, 1000)])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 300 * 3])
def test_flce_matches_reference(case, poison, n, hid, vocab, softcap, num_items, train_w, chunk_bytes):
    device, dtype, tol = case
    h = torch.randn(n, hid, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hid, dtype=torch.float64) / hid**0.5 * 3).to(device, dtype).requires_grad_(train_w)
    y = torch.randint(0, vocab, (n,))
    y[torch.rand(n) < 0.3] = -100
    y[0] = vocab - 1  # the last class exercises the block tail
    yd = y.to(device)

    loss = fused_linear_cross_entropy(h, w, yd, num_items_in_batch=num_items, softcap=softcap, chunk_bytes=chunk_bytes)
    g = 2.5  # a non-unit upstream gradient must scale dX and dW
    grads = torch.autograd.grad(loss * g, [h, w] if train_w else [h])

    hr = h.detach().double().cpu().requires_grad_()
    wr = w.detach().double().cpu().requires_grad_(train_w)
    lr = _ref(hr, wr, y, num_items, softcap)
    refs = torch.autograd.grad(lr * g, [hr, wr] if train_w else [hr])

    assert rel_err(loss, lr) < tol
    for out, ref in zip(grads, refs):
        assert out.dtype == dtype
        assert rel_err(out, ref) < tol


def test_flce_3d_hidden_and_all_ignored_rows():
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 16, device=DEVICE)
    y = torch.full((2, 5), -100, device=DEVICE)
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0
    y[1, 2] = 7
    h.grad = None
    fused_linear_cross_entropy(h, w, y).backward()
    ref = torch.autograd.grad(F.cross_entropy(h[1, 2:3] @ w.t(), y[1, 2:3]), h)[0]
    assert rel_err(h.grad, ref) < 1e-6


def test_flce_compute_dtype_runs_dx_built_in_it():
    # an fp32 head computed in bf16 (the QLoRA case): close to fp32, but not bit-equal
    h = torch.randn(9, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(70, 32, device=DEVICE) / 4
    y = torch.randint(0, 70, (9,), device=DEVICE)
    exact = fused_linear_cross_entropy(h, w, y)
    if DEVICE == "cpu":
        return  # the interpreter cannot hold bf16 logits
    low = fused_linear_cross_entropy(h, w, y, compute_dtype=torch.bfloat16)
    assert 0 < rel_err(low, exact) < 1e-2


def test_flce_under_no_grad_gives_the_same_loss_and_skips_gradients(monkeypatch):
    import sftop.kernels.fused_linear_cross_entropy as flce

    h = torch.randn(12, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(90, 16, device=DEVICE)
    y = torch.randint(0, 90, (12,), device=DEVICE)
    with_grad = fused_linear_cross_entropy(h, w, y)
    dx_built = []
    real_zeros_like = torch.zeros_like
    # dx is assembled with zeros_like only when gradients are computed
    monkeypatch.setattr(flce.torch, "zeros_like", lambda *a, **k: dx_built.append(1) or real_zeros_like(*a, **k))
    with torch.no_grad():
        evaluated = fused_linear_cross_entropy(h, w, y)
    assert not dx_built
    assert rel_err(evaluated, with_grad) < 1e-6


def test_a_plans_chunk_size_applies_where_a_call_names_none():
    from sftop.kernels import fused_linear_cross_entropy as flce
    from sftop.kernels.constants import FUSED_CE_CHUNK_BYTES

    vocab, elem = 128256, 2
    try:
        assert flce.chunk_rows(4096, vocab, elem) == FUSED_CE_CHUNK_BYTES // (vocab * elem)
        flce.set_chunk_bytes(64 << 20)
        assert flce.chunk_rows(4096, vocab, elem) == (64 << 20) // (vocab * elem) == 261
        assert flce.chunk_rows(4096, vocab, elem, chunk_bytes=1 << 30) == 4096  # a call's own size wins
    finally:
        flce.set_chunk_bytes(None)
    assert flce.chunk_rows(4096, vocab, elem) == FUSED_CE_CHUNK_BYTES // (vocab * elem)
