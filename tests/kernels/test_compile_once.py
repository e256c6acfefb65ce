"""Under padding-free batching the token count changes every step.  Each kernel must compile once
for all of them: a new binary per row count is a JIT stall of a second or more in the middle of
a run (GPU only: the CPU interpreter compiles nothing)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROW_COUNTS = (1, 17, 1000, 1024, 3333, 4096, 8191)


def _binaries(kernel) -> int:
    # JITFunction.device_caches: device -> (kernel_cache, ...); one entry per compiled binary
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def _fresh(kernel):
    kernel.device_caches.clear()


def test_rms_norm_compiles_once_for_all_row_counts():
    from sftop.kernels import rms_norm as mod

    _fresh(mod._rms_fwd)
    _fresh(mod._rms_bwd)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for n in ROW_COUNTS:
        x = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mod.rms_norm(x, w, 1e-5).sum().backward()
    assert _binaries(mod._rms_fwd) == 1
    assert _binaries(mod._rms_bwd) == 1


def test_glu_compiles_once_for_all_row_counts():
    from sftop.kernels import glu as mod

    for k in (mod._glu_fwd, mod._glu_bwd):
        _fresh(k)
    for n in ROW_COUNTS:
        g = torch.randn(n, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        u = torch.randn(n, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mod.GLUFunction.apply(g, u, mod.SWIGLU).sum().backward()
    assert _binaries(mod._glu_fwd) == 1
    assert _binaries(mod._glu_bwd) == 1


def test_loss_compiles_once_for_all_row_counts():
    from sftop.kernels import fused_linear_cross_entropy as mod

    _fresh(mod._ce_rows)
    w = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    for n in ROW_COUNTS:
        h = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, 1000, (n,), device="cuda")
        mod.fused_linear_cross_entropy(h, w, y).backward()
    assert _binaries(mod._ce_rows) == 1


def test_rope_compiles_once_per_direction_for_all_lengths():
    from sftop.kernels import rope as mod

    _fresh(mod._rope_kernel)
    for t in ROW_COUNTS:
        q = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 2, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(t, device="cuda", dtype=torch.float32)
        freqs = pos[:, None] * torch.rand(32, device="cuda")[None, :]
        emb = torch.cat([freqs, freqs], -1)[None]
        qo, ko = mod.apply_rope(q, k, emb.cos().bfloat16(), emb.sin().bfloat16())
        (qo.sum() + ko.sum()).backward()
    assert _binaries(mod._rope_kernel) == 2  # forward and backward (BACKWARD is a constexpr)
