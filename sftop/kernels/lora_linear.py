"""LoRA linears that share one input, as one autograd Function each: q/k/v together
(`LoRAQKVFunction`) and a single projection such as o_proj (`LoRALinearFunction`).

Each output is base(x) + s * (x @ A^T) @ B^T.  Why one Function instead of PEFT's layers:
  * launches: x is cast and flattened once; the low-rank products of all projections come from ONE
    small GEMM against the concatenated A matrices; each base product and its adapter product meet
    in one addmm.  Backward sums every projection's dX into one buffer with addmm_, and the adapter
    part of dX and all the A gradients are again one GEMM each over the concatenation.
  * memory: only x (which autograd would keep for the base GEMMs anyway) and the [tokens, sum r]
    product x @ A_cat^T are saved.
The A concatenation is rebuilt with torch.cat inside every call, so it can never go stale against
the trainable parameters.  Base weights are frozen; 4-bit bases are dequantised by bitsandbytes'
own kernels into a reused scratch buffer (see nf4.py), consumed before the next one is asked for.
A bias on the base layer is added in the same addmm as its GEMM.
"""

from __future__ import annotations

import torch

from . import compat
from .lora_mlp import adapter_then_base, base_weight, compute_dtype, scaled_mm


class _SharedInputLoRA(torch.autograd.Function):
    """forward(x, bases, scales, dtype, out_dtype, kept, a_1, b_1, ..., a_n, b_n) -> n outputs.

    `kept`: a recompute.KeptProjections or None.  When the layer's first run filled it (its
    attention kept the q/k/v these projections made), the recomputation computes only what
    backward needs (x @ A^T) and hands on placeholders for the outputs.
    """

    @staticmethod
    def forward(ctx, x, bases, scales, dtype, out_dtype, kept, *ab):
        # dtypes are resolved by the caller (autocast included); autocast re-casting single
        # matmuls would break the in-place accumulations
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _forward(ctx, x, bases, scales, dtype, out_dtype, kept, ab)

    @staticmethod
    def backward(ctx, *douts):
        with torch.autocast(device_type=douts[0].device.type, enabled=False):
            return _backward(ctx, douts)


class LoRAQKVFunction(_SharedInputLoRA):
    """q, k and v projections (base + LoRA) of one attention block, reading x once."""


class LoRALinearFunction(_SharedInputLoRA):
    """A single LoRA linear (o_proj, or any eligible layer outside a fused group)."""


def _cat_a(a_list, dtype):
    a = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    return a.to(dtype)


def _forward(ctx, x, bases, scales, dtype, out_dtype, kept, ab):
    a_list, b_list = ab[0::2], ab[1::2]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)
    a_c = _cat_a(a_list, dtype)
    b_c = [b.to(dtype) for b in b_list]
    xa = x2 @ a_c.t()  # [tokens, sum r]: every projection's low-rank product
    if kept is not None and kept.filled:
        # a recomputation whose attention takes the first run's q/k/v back itself
        outs = [kept.placeholder((*shape[:-1], base.out_features), out_dtype, x.device) for base in bases]
    else:
        outs = _outputs(x2, xa, bases, b_c, scales, dtype, out_dtype, shape[:-1])
    # the compute-dtype adapter copies are tiny ([sum r, in] and [out, r]); keeping them saves
    # backward from casting (and concatenating) them again
    ctx.save_for_backward(x2, xa, a_c, *b_c)
    ctx.bases, ctx.scales, ctx.x_shape, ctx.x_dtype = bases, scales, shape, x.dtype
    ctx.a_dtype, ctx.b_dtypes = a_list[0].dtype, [b.dtype for b in b_list]
    return tuple(outs) if len(outs) > 1 else outs[0]


def _outputs(x2, xa, bases, b_c, scales, dtype, out_dtype, lead_shape):
    outs, off = [], 0
    for base, b, s in zip(bases, b_c, scales):
        r = b.shape[1]
        bias = getattr(base, "bias", None)
        out = adapter_then_base(
            x2, base_weight(base, dtype).t(), xa[:, off : off + r], b.t(), s, None if bias is None else bias.to(dtype)
        )
        off += r
        out = out.view(*lead_shape, out.shape[-1])
        outs.append(out if out.dtype == out_dtype else out.to(out_dtype))
    return outs


def _backward(ctx, douts):
    x2, xa, a_c, *b_c = ctx.saved_tensors
    dt = x2.dtype
    scales = ctx.scales
    n_tok, ranks = x2.shape[0], [b.shape[1] for b in b_c]
    one_scale = len(set(scales)) == 1
    need_dx = ctx.needs_input_grad[0]
    dx = None
    # d_cat = [dy_1 @ B_1 * s_1 | ... ] : the gradient w.r.t. xa, written in place column block by
    # column block so the adapter part of dX and all A gradients are one GEMM each
    d_cat = torch.empty(n_tok, sum(ranks), dtype=dt, device=x2.device)
    grads_b, dys, off = [], [], 0
    for bc, s, r, dy, b_dtype in zip(b_c, scales, ranks, douts, ctx.b_dtypes):
        dy = dy.reshape(n_tok, -1)
        dy = dy if dy.dtype == dt else dy.to(dt)
        dys.append(dy)
        blk = d_cat[:, off : off + r]
        torch.mm(dy, bc, out=blk)
        if not one_scale:
            blk.mul_(s)
        grads_b.append(scaled_mm(dy.t(), xa[:, off : off + r], s, b_dtype))
        off += r
    s_all = scales[0] if one_scale else 1.0
    if need_dx:
        # the adapters' part of dX first, then every base GEMM adds into it (see adapter_then_base)
        dx = torch.empty(n_tok, x2.shape[1], dtype=dt, device=x2.device)
        dx.addmm_(d_cat, a_c, beta=0, alpha=s_all)
        for base, dy in zip(ctx.bases, dys):
            dx.addmm_(dy, base_weight(base, dt))
        dx = dx.view(ctx.x_shape)
        dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
    ga = scaled_mm(d_cat.t(), x2, s_all, ctx.a_dtype)
    grads, off = [], 0
    for r, gb in zip(ranks, grads_b):
        grads += [ga[off : off + r], gb]
        off += r
    return (dx, None, None, None, None, None, *grads)


def _dtypes(layer, x):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # the stock layers would compute, and return, the autocast dtype
        dt = torch.get_autocast_dtype(dev)
        return dt, dt
    # nn.Linear returns its weight dtype; bitsandbytes' Linear4bit casts back to the input dtype
    dt = compute_dtype(layer.base_layer, x)
    quantised = getattr(layer.base_layer.weight, "quant_state", None) is not None
    return dt, (x.dtype if quantised else dt)


def lora_linears(x, layers, adapter: str, kept=None):
    """Run PEFT LoRA layers that all read `x` (one adapter, no dropout/DoRA/LoRA bias) as one Function.

    Returns one output per layer (a tensor for one layer, a tuple for several).  `kept`: see
    `_SharedInputLoRA`.
    """
    dtype, out_dtype = _dtypes(layers[0], x)
    ab, scales = [], []
    for m in layers:
        a, b, scale = compat.lora_weights(m, adapter)
        ab += [a, b]
        scales.append(scale)
    fn = LoRALinearFunction if len(layers) == 1 else LoRAQKVFunction
    return fn.apply(x, tuple(m.base_layer for m in layers), tuple(scales), dtype, out_dtype, kept, *ab)
