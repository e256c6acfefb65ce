"""RMSNorm as one Triton kernel each way.

Two weight forms are supported because Hugging Face families differ:
  * Llama/Mistral/Qwen: y = w * cast(x * r)       (the normalised row is cast to the input dtype first)
  * Gemma:              y = cast(x * r * (1 + w)) (the multiply happens in fp32, then one cast)
where r = 1 / sqrt(mean(x^2) + eps).  Matching the cast order keeps bf16 outputs bit-close to HF.

Forward saves x and one fp32 r per row; backward recomputes the normalised row from them, so no
[rows, dim] fp32 temporary is kept between the passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import interpreting


@triton.jit(do_not_specialize=["n_rows"])
def _rms_fwd(
    X,
    Y,
    W,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    GEMMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # A [BLOCK_R, BLOCK] tile: several short rows per program on a GPU, and on the CPU
    # interpreter (whose cost is per operation, not per element) all rows at once.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    cmask = cols < n_cols
    m = cmask & (rows < n_rows)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + rows * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    n = x * r[:, None]
    if GEMMA:
        y = n * (1.0 + w)
    else:
        # HF casts the normalised row to the activation dtype before the weight multiply
        y = n.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)
    rvec = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(RSTD + rvec, r, mask=rvec < n_rows)


@triton.jit
def _rms_bwd_tiles(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    n_tiles,
    GEMMA: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Each program walks n_tiles consecutive tiles so that, when dW is needed, its partial sum is
    # one [BLOCK] row of DW_PART per program rather than one per input row.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw_acc = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for i in tl.range(0, n_tiles):
        rvec = (pid * n_tiles + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows = rvec[:, None]
        m = cmask & (rows < n_rows)
        x = tl.load(X + rows * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(RSTD + rvec, mask=rvec < n_rows, other=0.0)[:, None]
        n = x * r
        dn = dy * w
        # d/dx of x*r with r = (mean(x^2)+eps)^-1/2:  r * (dn - n * mean(dn * n))
        dx = r * (dn - n * (tl.sum(dn * n, axis=1)[:, None] / n_cols))
        tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
        if NEED_DW:
            if GEMMA:
                dw_acc += dy * n
            else:
                dw_acc += dy * n.to(X.dtype.element_ty).to(tl.float32)
    if NEED_DW:
        dcols = tl.arange(0, BLOCK)
        tl.store(DW_PART + pid * n_cols + dcols, tl.sum(dw_acc, axis=0), mask=dcols < n_cols)


# Row counts change every step under padding-free batching.  Triton compiles one binary per
# combination of constexprs and of integer "specialisations" (== 1, divisible by 16), so those
# arguments are left unspecialised and the tiles per program is a run-time loop bound: one
# compile serves every batch shape instead of a mid-run JIT stall whenever a new one appears.
@triton.jit(do_not_specialize=["n_rows", "n_tiles"])
def _rms_bwd(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    n_tiles,
    GEMMA: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _rms_bwd_tiles(
        DY,
        X,
        W,
        RSTD,
        DX,
        DW_PART,
        stride_dy,
        stride_x,
        stride_dx,
        n_rows,
        n_cols,
        n_tiles,
        GEMMA,
        NEED_DW,
        BLOCK_R,
        BLOCK,
    )


@triton.jit
def _rms_bwd_interp(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    GEMMA: tl.constexpr,
    NEED_DW: tl.constexpr,
    TILES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Triton's CPU interpreter cannot loop to a run-time bound; it compiles nothing, so a
    # compile-time tile count costs it nothing.
    _rms_bwd_tiles(
        DY,
        X,
        W,
        RSTD,
        DX,
        DW_PART,
        stride_dy,
        stride_x,
        stride_dx,
        n_rows,
        n_cols,
        TILES,
        GEMMA,
        NEED_DW,
        BLOCK_R,
        BLOCK,
    )


def _tile(n_rows: int, n_cols: int, device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK, num_warps) for a row-wise pass."""
    block = triton.next_power_of_2(n_cols)
    if device.type != "cuda":
        return max(1, triton.next_power_of_2(n_rows)) if n_rows * block <= (1 << 20) else 16, block, 4
    # about 4K elements per program: several rows when the rows are short (e.g. Qwen3's per-head
    # q/k norms over 128 dims), one row of a 2048..8192-wide hidden state otherwise
    block_r = max(1, min(16, 4096 // block))
    warps = 4 if block * block_r <= 4096 else (8 if block <= 8192 else 16)
    return block_r, block, warps


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, out_dtype=None, before_backward=None
    ):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        # HF's Llama form multiplies by the weight in the promoted dtype (an fp32 weight, as left by
        # prepare_model_for_kbit_training, yields fp32 output); Gemma's casts back to x's dtype.
        if out_dtype is None:
            out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_r, block, warps = _tile(n_rows, n_cols, x.device)
        _rms_fwd[(triton.cdiv(n_rows, block_r),)](
            x2,
            y,
            weight,
            rstd,
            x2.stride(0),
            y.stride(0),
            n_rows,
            n_cols,
            eps,
            GEMMA=gemma,
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=warps,
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        ctx.shape = shape
        ctx.before_backward = before_backward
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.before_backward is not None:
            ctx.before_backward(dy)
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        need_dw = ctx.needs_input_grad[1]
        block_r, block, warps = _tile(n_rows, n_cols, x2.device)
        n_tiles = triton.cdiv(n_rows, block_r)
        if need_dw and x2.device.type == "cuda":
            # a bounded number of programs keeps the fp32 partial-dW buffer small
            progs = min(n_tiles, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
        else:
            progs = n_tiles
        tiles = triton.cdiv(n_tiles, progs)
        grid = (triton.cdiv(n_tiles, tiles),)
        dw_part = torch.empty(grid[0], n_cols, dtype=torch.float32, device=x2.device) if need_dw else rstd
        args = (dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols)
        if not interpreting():
            _rms_bwd[grid](
                *args, tiles, GEMMA=ctx.gemma, NEED_DW=need_dw, BLOCK_R=block_r, BLOCK=block, num_warps=warps
            )
        else:
            _rms_bwd_interp[grid](
                *args, GEMMA=ctx.gemma, NEED_DW=need_dw, TILES=tiles, BLOCK_R=block_r, BLOCK=block, num_warps=warps
            )
        dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
        return dx.view(ctx.shape), dw, None, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    gemma: bool = False,
    out_dtype=None,
    before_backward=None,
) -> torch.Tensor:
    """RMSNorm over the last dimension; `gemma=True` uses the (1 + w) weight form.

    `out_dtype` overrides HF's output dtype (the statistics are fp32 regardless).
    `before_backward(dy)`, when given, is called as this norm's backward starts (the patcher's
    hook into the step's scheduling, see patching/parts/rms_norm.py).
    """
    return RMSNormFunction.apply(x, weight, eps, gemma, out_dtype, before_backward)
