"""Rotary position embedding for Q and K in one launch, HF's rotate_half convention.

out = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), x1/x2 the two halves of
the head dimension.  cos/sin are taken exactly as HF's rotary module returns them ([B or 1, T, D],
computed from position_ids), so packed batches whose position ids restart per document are right
without any extra bookkeeping: the kernel never looks at positions itself.

The rotation is orthogonal, so backward is the same kernel with the inverse rotation:
  d1 = g1*cos1 + g2*sin2,  d2 = g2*cos2 - g1*sin1.
Both halves of cos/sin are read (not assumed equal), so any per-dimension frequency layout that
HF produces with this convention is handled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_one(
    X,
    O,
    sxb,
    sxh,
    sxt,
    sob,
    soh,
    sot,
    COS,
    SIN,
    scb,
    sct,
    first_pos,
    n_pos,
    seq_len,
    n_heads,
    HALF: tl.constexpr,
    BP: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # rows of the tile are (position, head) pairs: BP positions x BH heads, flattened
    i = tl.arange(0, BP * BH)[:, None]
    p = first_pos + i // BH
    h = i % BH
    b = p // seq_len
    t = p % seq_len
    d = tl.arange(0, BD)[None, :]
    m = (p < n_pos) & (h < n_heads) & (d < HALF)
    cp = COS + b * scb + t * sct + d
    sp = SIN + b * scb + t * sct + d
    c1 = tl.load(cp, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF, mask=m, other=0.0).to(tl.float32)
    xp = X + b * sxb + t * sxt + h * sxh + d
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    op = O + b * sob + t * sot + h * soh + d
    tl.store(op, o1.to(O.dtype.element_ty), mask=m)
    tl.store(op + HALF, o2.to(O.dtype.element_ty), mask=m)


# position counts change every step under padding-free batching: one compile serves them all
@triton.jit(do_not_specialize=["n_pos", "seq_len"])
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    sqob,
    sqoh,
    sqot,
    skob,
    skoh,
    skot,
    scb,
    sct,
    n_pos,
    seq_len,
    n_qh,
    n_kh,
    HALF: tl.constexpr,
    BQH: tl.constexpr,
    BKH: tl.constexpr,
    BD: tl.constexpr,
    BP: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # one program: BP (batch, position) pairs, all their Q heads and all their K heads
    first = tl.program_id(0).to(tl.int64) * BP
    _rope_one(
        Q,
        QO,
        sqb,
        sqh,
        sqt,
        sqob,
        sqoh,
        sqot,
        COS,
        SIN,
        scb,
        sct,
        first,
        n_pos,
        seq_len,
        n_qh,
        HALF,
        BP,
        BQH,
        BD,
        BACKWARD,
    )
    _rope_one(
        K,
        KO,
        skb,
        skh,
        skt,
        skob,
        skoh,
        skot,
        COS,
        SIN,
        scb,
        sct,
        first,
        n_pos,
        seq_len,
        n_kh,
        HALF,
        BP,
        BKH,
        BD,
        BACKWARD,
    )


def _launch(q, k, cos, sin, backward: bool):
    """q [B,Hq,T,D], k [B,Hk,T,D] (any strides with unit last stride), cos/sin [B|1,T,D]."""
    bsz, n_qh, seq, dim = q.shape
    n_kh = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # Outputs in the [B,T,H,D] memory order the projections produce, viewed as [B,H,T,D]: the
    # attention call downstream then sees the same layout as on the stock path.
    qo = torch.empty(bsz, seq, n_qh, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    ko = torch.empty(bsz, seq, n_kh, dim, dtype=k.dtype, device=k.device).transpose(1, 2)
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    n_pos = bsz * seq
    half = dim // 2
    bd = triton.next_power_of_2(half)
    bqh, bkh = triton.next_power_of_2(n_qh), triton.next_power_of_2(n_kh)
    if q.device.type == "cuda":
        bp = max(1, min(8, 4096 // (bqh * bd)))
    else:  # the interpreter pays per operation: everything in as few programs as memory allows
        bp = max(1, min(triton.next_power_of_2(n_pos), (1 << 18) // (bqh * bd)))
    _rope_kernel[(triton.cdiv(n_pos, bp),)](
        q,
        k,
        qo,
        ko,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        qo.stride(0),
        qo.stride(1),
        qo.stride(2),
        ko.stride(0),
        ko.stride(1),
        ko.stride(2),
        scb,
        cos.stride(-2),
        n_pos,
        seq,
        n_qh,
        n_kh,
        HALF=half,
        BQH=bqh,
        BKH=bkh,
        BD=bd,
        BP=bp,
        BACKWARD=backward,
    )
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dqi, dki = _launch(dq, dk, cos, sin, backward=True)
        return dqi, dki, None, None


def rotate_back(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE's backward on its own: the gradients of q and k ([B,H,T,D]) given those of the rotated ones."""
    return _launch(dq, dk, cos, sin, backward=True)


def rope_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Shapes this kernel handles; anything else (partial rotary, odd head dim) goes the stock way."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    b, _, t, d = q.shape
    if d % 2 or k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        return False
    return cos.shape[-1] == d and cos.shape[1] == t and cos.shape[0] in (1, b)


def apply_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for HF's apply_rotary_pos_emb (q, k as [B,H,T,D] when unsqueeze_dim=1, [B,T,H,D] when 2)."""
    if unsqueeze_dim == 2:
        qo, ko = RoPEFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return RoPEFunction.apply(q, k, cos, sin)
