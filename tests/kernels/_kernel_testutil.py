"""Shared helpers for the kernel tests (imported by name: tests/ is not a package)."""

import math

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (device, dtype, relative-error bound vs a float64 reference).  The Triton interpreter handles
# bf16 too, so CI exercises the bf16 load/store and rounding paths, not only the GPU run.
CASES = [(DEVICE, torch.float32, 1e-5), (DEVICE, torch.bfloat16, 1e-2)]
CASE_IDS = [f"{d}-{str(t).split('.')[-1]}" for d, t, _ in CASES]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in `out` gives inf so it can never pass."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    assert o.shape == r.shape, (o.shape, r.shape)
    if not torch.isfinite(o).all():
        return math.inf
    denom = r.norm().item()
    return (o - r).norm().item() / (denom if denom > 0 else 1.0)
