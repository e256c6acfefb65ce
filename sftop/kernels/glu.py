"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU (gelu_tanh(gate) * up).

One elementwise kernel each way.  Forward keeps only gate and up (the inputs, which the linear
layers' backward needs anyway); backward recomputes the activation instead of storing it, so the
intermediate-sized activation tensor never lives across the step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SWIGLU = 0
GEGLU = 1


@triton.jit
def _tanh(x):
    # tanh through sigmoid: exact in fp32 to rounding and available both compiled and interpreted
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit(do_not_specialize=["n"])  # n changes with every batch shape: one compile for all
def _glu_fwd(G, U, H, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    if KIND == 0:
        a = g * tl.sigmoid(g)
    else:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
    tl.store(H + offs, (a * u).to(H.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _glu_bwd(DH, G, U, DG, DU, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    if KIND == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    tl.store(DG + offs, (dh * u * da).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + offs, (dh * a).to(DU.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _glu_bwd_inplace(DH, G, U, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Reads dh, g, u and overwrites them with h, dg, du: the fused LoRA MLP needs h again for
    the down projection's adapter gradients, and this way the backward allocates no
    intermediate-sized buffer at all."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    if KIND == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    tl.store(DH + offs, (a * u).to(DH.dtype.element_ty), mask=m)
    tl.store(G + offs, (dh * u * da).to(G.dtype.element_ty), mask=m)
    tl.store(U + offs, (dh * a).to(U.dtype.element_ty), mask=m)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, kind: int) -> torch.Tensor:
    """h = act(gate) * up without autograd (for callers that write their own backward)."""
    h = torch.empty_like(gate)
    n = gate.numel()
    block = _block(n, gate.device)
    _glu_fwd[(triton.cdiv(n, block),)](gate, up, h, n, KIND=kind, BLOCK=block, num_warps=FWD_WARPS)
    return h


def glu_backward_inplace(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: int) -> None:
    """dh, gate, up (same shape, contiguous) become h, d(gate), d(up)."""
    n = gate.numel()
    block = _block(n, gate.device)
    _glu_bwd_inplace[(triton.cdiv(n, block),)](dh, gate, up, n, KIND=kind, BLOCK=block, num_warps=BWD_WARPS)


def _block(n: int, device) -> int:
    # The interpreter's cost is per program, so it gets big blocks.  On a GPU: 1024 elements per
    # program, with the warp counts below.
    if device.type != "cuda":
        return max(16, min(triton.next_power_of_2(n), 1 << 16))
    return 1024


# Warps per 1024-element program, measured on an H200 at the Llama-3.2-1B MLP shape
# (benchmarks/glu_block_sweep.py, 2026-12-02): the in-place backward moves 6 bytes per element
# pair at 1.45 TB/s with 4 warps and 3.58 TB/s with 16; the forward 1.89 TB/s with 4, 2.89 with 8.
FWD_WARPS = 8
BWD_WARPS = 16


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kind: int):
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        g = gate.contiguous()
        u = up.contiguous()
        h = torch.empty_like(g, dtype=torch.promote_types(g.dtype, u.dtype))
        n = g.numel()
        block = _block(n, g.device)
        _glu_fwd[(triton.cdiv(n, block),)](g, u, h, n, KIND=kind, BLOCK=block, num_warps=FWD_WARPS)
        ctx.save_for_backward(g, u)
        ctx.kind = kind
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg = torch.empty_like(g)
        du = torch.empty_like(u)
        n = g.numel()
        block = _block(n, g.device)
        _glu_bwd[(triton.cdiv(n, block),)](dh, g, u, dg, du, n, KIND=ctx.kind, BLOCK=block, num_warps=BWD_WARPS)
        return dg, du, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return GLUFunction.apply(gate, up, SWIGLU)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation of GELU (HF's gelu_pytorch_tanh / gelu_new)."""
    return GLUFunction.apply(gate, up, GEGLU)
