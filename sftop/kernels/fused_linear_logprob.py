"""lm_head matmul + per-token log-probabilities over token chunks, without the [tokens, vocab] logits.

Preference tuning (DPO and its variants) needs log p(label_t | context) for every completion token
of the chosen and rejected answers, with their gradient, where SFT needs only the summed loss.
Design, as in `fused_linear_cross_entropy`: per chunk of tokens one matmul (cuBLAS) makes the
logits, then one Triton kernel per row computes, in fp32 and in one online pass over the
vocabulary, the log-sum-exp, the label's log-probability, the entropy, the mean logit and whether
the label is the top token; a second pass in the same launch overwrites the logits buffer with
d(log p_label)/d(logits) = onehot - softmax.  One more matmul turns that into the chunk's
"unit" dX.  The incoming gradient of a log-probability scales its own row only, so backward is a
row-wise multiply: no logits are recomputed and nothing [tokens, vocab]-sized lives past a chunk.

When the lm_head weight itself trains (rare with LoRA), its gradient is a sum over rows weighted
by the incoming gradients, unknown at forward time: backward then recomputes each chunk's logits
from the saved hidden states and log-sum-exp.

Entropy, mean logit and top-1 are metrics (TRL logs them): they carry no gradient.
Optional Gemma-2 softcapping applies cap * tanh(logits / cap) before the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_linear_cross_entropy import _ce_tile, _tanh, chunk_rows


@triton.jit(do_not_specialize=["n_rows"])  # rows change every step: one compile for all
def _logprob_rows(
    LOGITS,
    LABELS,
    LOGP,
    LSE,
    ENT,
    MEAN,
    TOP1,
    SCALE,
    stride_l,
    n_rows,
    n_vocab,
    ignore_index,
    softcap,
    SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SCALED: tl.constexpr,
    USE_LSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
    N_VB: tl.constexpr,
):
    """Per row: log p(label), lse (+ entropy, mean logit, top-1); then LOGITS <- onehot - softmax.

    USE_LSE: the row's lse is already known (backward recompute): skip the statistics pass.
    SCALED: multiply each row's gradient by SCALE[row] (backward recompute for dW).
    """
    rvec = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rvec < n_rows
    label = tl.load(LABELS + rvec, mask=ok, other=ignore_index).to(tl.int64)
    counted = ok & (label != ignore_index)
    lab = label[:, None]
    base = LOGITS + rvec[:, None] * stride_l
    cols = tl.arange(0, BLOCK)[None, :]
    if USE_LSE:
        lse = tl.load(LSE + rvec, mask=ok, other=0.0)
    else:
        # online max / sum-exp / sum z*exp (entropy) / sum z (mean), all fp32.  The start is
        # finite so rows past n_rows, which see only masked blocks, never compute -inf - -inf.
        m_run = tl.full([BLOCK_R], -1.0e30, tl.float32)
        s_run = tl.zeros([BLOCK_R], tl.float32)
        t_run = tl.zeros([BLOCK_R], tl.float32)
        z_sum = tl.zeros([BLOCK_R], tl.float32)
        for j in tl.range(0, N_VB):
            c = j * BLOCK + cols
            cm = (c < n_vocab) & ok[:, None]
            z = tl.load(base + c, mask=cm, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = softcap * _tanh(z / softcap)
            zm = tl.where(cm, z, -float("inf"))
            m_new = tl.maximum(m_run, tl.max(zm, axis=1))
            alpha = tl.exp(m_run - m_new)
            e = tl.exp(zm - m_new[:, None])
            s_run = s_run * alpha + tl.sum(e, axis=1)
            t_run = t_run * alpha + tl.sum(e * z, axis=1)
            z_sum += tl.sum(tl.where(cm, z, 0.0), axis=1)
            m_run = m_new
        s_safe = tl.where(ok, s_run, 1.0)
        lse = m_run + tl.log(s_safe)
        safe_label = tl.where(counted, label, 0)
        zt = tl.load(LOGITS + rvec * stride_l + safe_label, mask=counted, other=0.0).to(tl.float32)
        if SOFTCAP:
            zt = softcap * _tanh(zt / softcap)
        tl.store(LOGP + rvec, tl.where(counted, zt - lse, 0.0), mask=ok)
        tl.store(LSE + rvec, lse, mask=ok)
        if STATS:
            # entropy = lse - E_p[z]; rows that don't count report zeros, as TRL's head does
            tl.store(ENT + rvec, tl.where(counted, lse - t_run / s_safe, 0.0), mask=ok)
            tl.store(MEAN + rvec, tl.where(counted, z_sum / n_vocab, 0.0), mask=ok)
            tl.store(TOP1 + rvec, (counted & (zt >= m_run)).to(tl.int8), mask=ok)
    if WRITE_GRAD:
        if SCALED:
            scale = tl.load(SCALE + rvec, mask=ok, other=0.0).to(tl.float32)
        for j in tl.range(0, N_VB):
            c = j * BLOCK + cols
            cm = (c < n_vocab) & ok[:, None]
            z = tl.load(base + c, mask=cm, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(z / softcap)
                zc = softcap * t
            else:
                zc = z
            g = tl.where(c == lab, 1.0, 0.0) - tl.exp(zc - lse[:, None])
            if SOFTCAP:
                g = g * (1.0 - t * t)
            if SCALED:
                g = g * scale[:, None]
            g = tl.where(counted[:, None], g, 0.0)
            tl.store(base + c, g.to(LOGITS.dtype.element_ty), mask=cm)


def _launch(
    logits, labels, logp, lse, ent, mean, top1, scale, *, n_vocab, ignore_index, softcap, stats, write_grad, use_lse
):
    rows = logits.shape[0]
    block_r, block = _ce_tile(rows, n_vocab, logits.device)
    dummy = lse
    _logprob_rows[(triton.cdiv(rows, block_r),)](
        logits,
        labels,
        logp if logp is not None else dummy,
        lse,
        ent if ent is not None else dummy,
        mean if mean is not None else dummy,
        top1 if top1 is not None else dummy,
        scale if scale is not None else dummy,
        logits.stride(0),
        rows,
        n_vocab,
        ignore_index,
        float(softcap) if softcap else 1.0,
        SOFTCAP=bool(softcap),
        STATS=stats,
        WRITE_GRAD=write_grad,
        SCALED=scale is not None,
        USE_LSE=use_lse,
        BLOCK_R=block_r,
        BLOCK=block,
        N_VB=triton.cdiv(n_vocab, block),
        num_warps=8 if block >= 4096 else 4,
    )


class FusedLinearLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, softcap, chunk_bytes, compute_dtype, grad_mode, stats):
        h_shape = hidden.shape
        x = hidden.reshape(-1, h_shape[-1])
        y = labels.reshape(-1).to(x.device)
        if y.numel() != x.shape[0]:
            raise ValueError(f"{x.shape[0]} hidden rows but {y.numel()} labels")
        n, n_vocab = x.shape[0], weight.shape[0]
        # forward runs with grad disabled and needs_input_grad ignores the caller's no_grad(): the
        # reference forward (no grad) then skips the dX matmul per chunk
        need_dx = ctx.needs_input_grad[0] and grad_mode
        need_dw = ctx.needs_input_grad[1] and grad_mode
        if compute_dtype is None:
            compute_dtype = torch.promote_types(x.dtype, weight.dtype)
        w_c = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
        elem = torch.empty((), dtype=compute_dtype).element_size()
        step = chunk_rows(n, n_vocab, elem, chunk_bytes)
        f32 = dict(dtype=torch.float32, device=x.device)
        logp = torch.empty(n, **f32)
        lse = torch.empty(n, **f32)
        ent = torch.empty(n, **f32) if stats else None
        mean = torch.empty(n, **f32) if stats else None
        top1 = torch.empty(n, dtype=torch.int8, device=x.device) if stats else None
        unit_dx = torch.empty(n, x.shape[1], dtype=x.dtype, device=x.device) if need_dx else None
        for s in range(0, n, step):
            e = min(n, s + step)
            logits = x[s:e].to(compute_dtype) @ w_c.t()
            _launch(
                logits,
                y[s:e],
                logp[s:e],
                lse[s:e],
                ent[s:e] if stats else None,
                mean[s:e] if stats else None,
                top1[s:e] if stats else None,
                None,
                n_vocab=n_vocab,
                ignore_index=ignore_index,
                softcap=softcap,
                stats=stats,
                write_grad=need_dx,
                use_lse=False,
            )
            if need_dx:
                unit_dx[s:e] = (logits @ w_c).to(x.dtype)
            del logits  # freed before the next chunk's matmul: one chunk of logits alive at a time
        ctx.has = (need_dx, need_dw)
        ctx.h_shape = h_shape
        ctx.w_dtype = weight.dtype
        ctx.cfg = (ignore_index, softcap, chunk_bytes, compute_dtype)
        saved = [unit_dx] if need_dx else []
        if need_dw:
            saved += [x, weight, y, lse]
        ctx.save_for_backward(*saved)
        outs = (logp.view(h_shape[:-1]),)
        if stats:
            metrics = (ent.view(h_shape[:-1]), mean.view(h_shape[:-1]), top1.view(h_shape[:-1]).bool())
            ctx.mark_non_differentiable(*metrics)
            outs += metrics
        return outs

    @staticmethod
    def backward(ctx, grad_logp, *_):
        need_dx, need_dw = ctx.has
        saved = list(ctx.saved_tensors)
        g = grad_logp.reshape(-1).to(torch.float32)
        dx = dw = None
        if need_dx:
            unit_dx = saved.pop(0)
            # in place: each element is scaled in fp32 and rounded once, with no [tokens, hidden]
            # temporary (the saved buffer is used by this one backward only)
            dx = unit_dx.mul_(g[:, None]).view(ctx.h_shape)
        if need_dw:
            x, weight, y, lse = saved
            ignore_index, softcap, chunk_bytes, compute_dtype = ctx.cfg
            n_vocab = weight.shape[0]
            w_c = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
            # the row gradients are summed over tokens with signs of their own, which a 16-bit
            # buffer would round before the sum: this (rare) path keeps them in fp32
            step = chunk_rows(x.shape[0], n_vocab, 4, chunk_bytes)
            acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for s in range(0, x.shape[0], step):
                e = min(x.shape[0], s + step)
                xc = x[s:e]
                logits = (xc.to(compute_dtype) @ w_c.t()).float()
                _launch(
                    logits,
                    y[s:e],
                    None,
                    lse[s:e],
                    None,
                    None,
                    None,
                    g[s:e],
                    n_vocab=n_vocab,
                    ignore_index=ignore_index,
                    softcap=softcap,
                    stats=False,
                    write_grad=True,
                    use_lse=True,
                )
                acc.addmm_(logits.t().to(torch.float32), xc.to(torch.float32))
                del logits
            dw = acc.to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None, None, None


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_bytes: int | None = None,
    compute_dtype: torch.dtype | None = None,
    stats: bool = False,
):
    """log softmax(hidden @ weight.T)[label] per row, fp32, 0 where the label is `ignore_index`.

    `labels` must already be aligned with `hidden` rows (shift them first for causal LM).  Returns
    the log-probabilities (shape of `labels`); with `stats=True` a tuple (log_probs, entropy,
    mean_logits, is_top1), the last three without gradient.
    """
    out = FusedLinearLogProbFunction.apply(
        hidden,
        weight,
        labels,
        ignore_index,
        softcap,
        chunk_bytes,
        compute_dtype,
        torch.is_grad_enabled(),
        stats,
    )
    return out if stats else out[0]
