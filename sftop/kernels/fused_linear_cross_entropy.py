"""lm_head matmul + cross-entropy over token chunks, without the full [tokens, vocab] logits.

Design: for each chunk of tokens the logits are computed with one matmul (cuBLAS), then one Triton
kernel per row computes the fp32 log-sum-exp and, in the same launch, overwrites the logits buffer
with d(loss)/d(logits).  Two more matmuls turn that into the chunk's dX (and dW when lm_head is
trainable).  Everything the backward needs is therefore ready at the end of forward; backward only
scales by the incoming gradient.  Peak extra memory is one chunk of logits plus dX, whatever the
sequence length.

Loss semantics follow transformers' ForCausalLMLoss: labels equal to ignore_index do not count;
the sum over counted tokens is divided by `num_items_in_batch` when given (so gradient
accumulation and packing weigh every token equally across micro-batches), else by the number of
counted tokens.  Optional Gemma-2 softcapping applies cap * tanh(logits / cap) before the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import FUSED_CE_CHUNK_BYTES as DEFAULT_CHUNK_BYTES  # one chunk's logits stay under this


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit(do_not_specialize=["n_rows"])  # rows change every step: one compile for all
def _ce_rows(
    LOGITS,
    LABELS,
    LOSS,
    stride_l,
    n_rows,
    n_vocab,
    ignore_index,
    softcap,
    SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
    N_VB: tl.constexpr,
):
    """Per row: loss = lse - logit[label]; then LOGITS[row] <- softmax - onehot (x softcap')."""
    rvec = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rvec < n_rows
    label = tl.load(LABELS + rvec, mask=ok, other=ignore_index).to(tl.int64)
    counted = ok & (label != ignore_index)
    rows = rvec[:, None]
    lab = label[:, None]
    base = LOGITS + rows * stride_l
    cols = tl.arange(0, BLOCK)[None, :]
    # pass 1: online max / sum-exp in fp32.  The start is finite so that rows past n_rows, which
    # see only masked blocks, never compute -inf - -inf = NaN.
    m_run = tl.full([BLOCK_R], -1.0e30, tl.float32)
    s_run = tl.zeros([BLOCK_R], tl.float32)
    # N_VB (vocab blocks) is a compile-time count: the vocab is fixed per model, and Triton's
    # interpreter cannot loop to a run-time bound under numpy 2.
    for j in tl.range(0, N_VB):
        c = j * BLOCK + cols
        cm = (c < n_vocab) & ok[:, None]
        z = tl.load(base + c, mask=cm, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(cm, z, -float("inf"))
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_run = m_new
    lse = m_run + tl.log(tl.where(ok, s_run, 1.0))
    safe_label = tl.where(counted, label, 0)
    zt = tl.load(LOGITS + rvec * stride_l + safe_label, mask=counted, other=0.0).to(tl.float32)
    if SOFTCAP:
        zt = softcap * _tanh(zt / softcap)
    tl.store(LOSS + rvec, tl.where(counted, lse - zt, 0.0), mask=ok)
    # pass 2: gradient of each row's (unscaled) loss, written over its logits
    for j in tl.range(0, N_VB):
        c = j * BLOCK + cols
        cm = (c < n_vocab) & ok[:, None]
        z = tl.load(base + c, mask=cm, other=0.0).to(tl.float32)
        if SOFTCAP:
            t = _tanh(z / softcap)
            zc = softcap * t
        else:
            zc = z
        g = tl.exp(zc - lse[:, None]) - tl.where(c == lab, 1.0, 0.0)
        if SOFTCAP:
            g = g * (1.0 - t * t)
        g = tl.where(counted[:, None], g, 0.0)
        tl.store(base + c, g.to(LOGITS.dtype.element_ty), mask=cm)


def _ce_tile(n_rows: int, n_vocab: int, device) -> tuple[int, int]:
    """(BLOCK_R, BLOCK) for the row kernel."""
    if device.type != "cuda":
        # the interpreter pays per operation: whole vocab and as many rows as fit in ~1M elements
        block = triton.next_power_of_2(n_vocab)
        return max(1, min(triton.next_power_of_2(n_rows), (1 << 20) // block)), block
    return 1, min(8192, triton.next_power_of_2(n_vocab))


_process_chunk_bytes = DEFAULT_CHUNK_BYTES


def set_chunk_bytes(chunk_bytes: int | None) -> None:
    """The logits chunk the fused losses use in this process where a call names none: a plan's
    `loss_chunk_mib` (the planner takes a smaller one where the default leaves CUDA graphs no room);
    None restores the default."""
    global _process_chunk_bytes
    _process_chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)


def chunk_rows(n_rows: int, n_vocab: int, elem_bytes: int, chunk_bytes: int | None = None) -> int:
    budget = _process_chunk_bytes if chunk_bytes is None else chunk_bytes
    return max(1, min(n_rows, budget // max(1, n_vocab * elem_bytes)))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        num_items_in_batch,
        ignore_index,
        softcap,
        chunk_bytes,
        compute_dtype,
        grad_mode,
        select_rows,
    ):
        h_shape = hidden.shape
        x = hidden.reshape(-1, h_shape[-1])
        y = labels.reshape(-1).to(x.device)
        if y.numel() != x.shape[0]:
            raise ValueError(f"{x.shape[0]} hidden rows but {y.numel()} labels")
        n_vocab = weight.shape[0]
        # forward always runs with grad disabled, and needs_input_grad ignores the caller's
        # no_grad(), so the caller's grad mode comes in as an argument: evaluation then skips the
        # two gradient matmuls per chunk
        need_dx = ctx.needs_input_grad[0] and grad_mode
        need_dw = ctx.needs_input_grad[1] and grad_mode

        counted = y != ignore_index
        n_counted = counted.sum()
        if select_rows:
            # Rows that don't count cost a full vocab matmul for nothing; SFT masks whole prompts,
            # so drop them up front (one host sync for the index, paid once per step).
            idx = counted.nonzero().squeeze(1)
            xs = x.index_select(0, idx)
            ys = y.index_select(0, idx)
        else:
            # inside a CUDA graph capture (no host sync allowed): every row goes through the
            # kernel, which gives ignored rows zero loss and zero gradient
            idx, xs, ys = None, x, y
        n = xs.shape[0]

        if compute_dtype is None:
            compute_dtype = torch.promote_types(x.dtype, weight.dtype)
        # cast once per call, not once per chunk
        w_c = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        elem = torch.empty((), dtype=compute_dtype).element_size()
        step = chunk_rows(n, n_vocab, elem, chunk_bytes)
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        dxs = torch.empty(n, x.shape[1], dtype=x.dtype, device=x.device) if need_dx else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for s in range(0, n, step):
            e = min(n, s + step)
            xc = xs[s:e]
            logits = xc.to(compute_dtype) @ w_c.t()
            rows = e - s
            block_r, block = _ce_tile(rows, n_vocab, x.device)
            _ce_rows[(triton.cdiv(rows, block_r),)](
                logits,
                ys[s:e],
                loss_rows[s:e],
                logits.stride(0),
                rows,
                n_vocab,
                ignore_index,
                float(softcap) if softcap else 1.0,
                SOFTCAP=bool(softcap),
                BLOCK_R=block_r,
                BLOCK=block,
                N_VB=triton.cdiv(n_vocab, block),
                num_warps=8 if block >= 4096 else 4,
            )
            if need_dx:
                dxs[s:e] = (logits @ w_c).to(x.dtype)
            if need_dw:
                dw.addmm_(logits.t().to(torch.float32), xc.to(torch.float32))
            # released before the next chunk's matmul allocates its logits: otherwise two chunks
            # are live at once (measured: +0.5 GiB at the peak of a 1B step)
            del logits

        if num_items_in_batch is None:
            denom = n_counted.clamp(min=1).to(torch.float32)
        elif torch.is_tensor(num_items_in_batch):
            denom = num_items_in_batch.to(device=x.device, dtype=torch.float32)
        else:
            denom = torch.tensor(float(num_items_in_batch), device=x.device)
        loss = loss_rows.sum() / denom

        if need_dx and idx is None:
            dx = dxs.view(h_shape)
        elif need_dx:
            dx = torch.zeros_like(x)
            dx.index_copy_(0, idx, dxs)
            dx = dx.view(h_shape)
        else:
            dx = None
        ctx.save_for_backward(*(t for t in (dx, dw, denom) if t is not None))
        ctx.has = (dx is not None, dw is not None)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        scale = grad_loss / saved.pop()
        dx = dw = None
        if ctx.has[0]:
            # a 0-dim fp32 factor keeps dx in its own dtype under type promotion
            dx = saved.pop(0) * scale
        if ctx.has[1]:
            dw = (saved.pop(0) * scale).to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    select_rows: bool = True,
) -> torch.Tensor:
    """Mean (or sum / num_items_in_batch) cross-entropy of `hidden @ weight.T` against `labels`.

    `labels` must already be aligned with `hidden` rows (shift them first for causal LM).
    `compute_dtype` sets the dtype of the two matmuls (default: promoted from hidden and weight);
    the softmax and the loss are fp32 either way.  `select_rows=False` skips dropping the rows
    that don't count (which needs a host sync) so that the call can be captured in a CUDA graph.
    """
    return FusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        num_items_in_batch,
        ignore_index,
        softcap,
        chunk_bytes,
        compute_dtype,
        torch.is_grad_enabled(),
        select_rows,
    )


def loss_from_sum(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch, ignore_index: int = -100):
    """The loss `fused_linear_cross_entropy` returns, from the sum of its token losses (what a
    CUDA graph computes, `num_items_in_batch` = 1): divided by `num_items_in_batch` where given,
    else by the labels that count.  Applied outside a graph, the denominator can change every
    step without a new capture."""
    if num_items_in_batch is None:
        return total / (labels != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        return total / num_items_in_batch.to(device=total.device, dtype=torch.float32)
    return total / float(num_items_in_batch)
