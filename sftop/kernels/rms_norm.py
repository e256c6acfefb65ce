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

from ._runtime import launch_rows_per_program


@triton.jit
def _rms_fwd(
    X, Y, W, RSTD,
    stride_x, stride_y,
    n_rows, n_cols, eps,
    GEMMA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    for i in tl.range(0, ROWS):
        row = pid * ROWS + i
        ok = row < n_rows
        m = cmask & ok
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = x * r
        if GEMMA:
            y = n * (1.0 + w)
        else:
            # HF casts the normalised row to the activation dtype before the weight multiply
            y = n.to(X.dtype.element_ty).to(tl.float32) * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, r, mask=ok)


@triton.jit
def _rms_bwd(
    DY, X, W, RSTD, DX, DW_PART,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols,
    GEMMA: tl.constexpr, NEED_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(0, ROWS):
        row = pid * ROWS + i
        ok = row < n_rows
        m = cmask & ok
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(RSTD + row, mask=ok, other=0.0)
        n = x * r
        dn = dy * w
        # d/dx of x*r with r = (mean(x^2)+eps)^-1/2:  r * (dn - n * mean(dn * n))
        dx = r * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
        if NEED_DW:
            if GEMMA:
                dw_acc += dy * n
            else:
                dw_acc += dy * n.to(X.dtype.element_ty).to(tl.float32)
    if NEED_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=cmask)


def _block(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        # HF's Llama form multiplies by the weight in the promoted dtype (an fp32 weight, as left by
        # prepare_model_for_kbit_training, yields fp32 output); Gemma's casts back to x's dtype.
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rows = launch_rows_per_program(n_rows, x.device)
        block = _block(n_cols)
        grid = (triton.cdiv(n_rows, rows),)
        _rms_fwd[grid](
            x2, y, weight, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
            GEMMA=gemma, ROWS=rows, BLOCK=block, num_warps=_warps(block),
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        need_dw = ctx.needs_input_grad[1]
        block = _block(n_cols)
        if need_dw:
            # A bounded number of programs, each summing its rows' dW in registers: the partial
            # buffer stays [programs, dim] instead of [rows, dim].
            if x2.device.type == "cuda":
                progs = min(n_rows, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
            else:
                progs = min(n_rows, 4)
            rows = triton.cdiv(n_rows, max(progs, 1))
        else:
            rows = launch_rows_per_program(n_rows, x2.device)
        grid = (triton.cdiv(n_rows, rows),)
        dw_part = (
            torch.empty(grid[0], n_cols, dtype=torch.float32, device=x2.device) if need_dw else rstd
        )
        _rms_bwd[grid](
            dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
            GEMMA=ctx.gemma, NEED_DW=need_dw, ROWS=rows, BLOCK=block, num_warps=_warps(block),
        )
        dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension; `gemma=True` uses the (1 + w) weight form."""
    return RMSNormFunction.apply(x, weight, eps, gemma)
