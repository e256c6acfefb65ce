"""The whole LoRA gated MLP as one autograd Function: down(glu(gate(x), up(x))) where each of
gate/up/down is base(x) + s * (x @ A^T) @ B^T.

Under gradient checkpointing (a layer run handed in, and SFTOP_CHUNKED_MLP=1) it saves less still:
not even gate and up.
The first run goes a token chunk at a time, the recomputation computes only the rank-r products,
and backward rebuilds gate and up chunk by chunk (constants.MLP_REGATE_CHUNK_BYTES says why).

Why one Function instead of three PEFT layers and an activation:
  * memory: only x, the gate and up pre-activations and three rank-r products are saved.  The
    activation output h is not kept: backward recomputes it in the same Triton pass that turns
    (dh, gate, up) into (h, d_gate, d_up) in place, so backward allocates no intermediate-sized
    buffer beyond dh, and dh itself only a token chunk at a time for large batches.  Under
    gradient checkpointing this is the largest transient of a layer.
  * recomputation: under gradient checkpointing the second run of a layer skips the down
    projection's GEMMs, whose output backward never reads, and takes the down adapter's rank-r
    product from the first run, so it skips the activation too (sftop/kernels/recompute.py).
  * launches: the base and adapter products of each projection meet in one addmm, and the fp32
    adapter weights are cast to the compute dtype once per call instead of per PEFT layer.
Base weights are frozen (no gradient); 4-bit bases are dequantised by bitsandbytes' own kernels
into one reused scratch buffer per device (sftop/kernels/nf4.py), so no 16-bit copy of the model
persists.
"""

from __future__ import annotations

import torch
from torch import nn

from . import compat
from .constants import CHUNKED_MLP_ENV, MLP_DH_CHUNK_BYTES, MLP_REGATE_CHUNK_BYTES, dh_chunk_rows
from .env import env_flag
from .glu import glu_backward_inplace, glu_forward
from .nf4 import dequantize_4bit_weight


def base_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight of a frozen base layer, in `dtype`."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        # valid until the next dequantisation: every caller here consumes it at once
        return dequantize_4bit_weight(w, dtype)
    return w if w.dtype == dtype else w.to(dtype)


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    dt = getattr(layer, "compute_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        return x.dtype if x.dtype != torch.float32 else w.quant_state.dtype
    return w.dtype


def scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """scale * m1 @ m2 in one GEMM (alpha; beta=0 ignores the uninitialised buffer), then cast to
    the parameter dtype when that differs."""
    out = torch.empty(m1.shape[0], m2.shape[1], dtype=m1.dtype, device=m1.device)
    out.addmm_(m1, m2, beta=0, alpha=scale)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def adapter_then_base(
    inp: torch.Tensor,
    w: torch.Tensor,
    ia: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """inp @ w + scale * ia @ b (+ bias), for a rank-r `ia` [tokens, r] and `b` [r, out], into
    `out` when given (a reused buffer of that shape; no bias then).

    The rank-r product writes the output first and the base GEMM then adds into it (beta=1).  In
    the other order the rank-r addmm re-reads and re-writes the whole [tokens, out] output in a
    memory-bound pass of its own; this way the output is written once and read back inside the
    compute-bound GEMM's epilogue, where it costs nothing measurable (docs/benchmarks.md).
    """
    if bias is None:
        if out is None:
            out = torch.empty(ia.shape[0], b.shape[1], dtype=ia.dtype, device=ia.device)
        out.addmm_(ia, b, beta=0, alpha=scale)  # beta=0: the uninitialised buffer is never read
    else:
        out = torch.addmm(bias, ia, b, alpha=scale)
    return out.addmm_(inp, w)


def _project(inp, base, a, b, scale):
    ia = inp @ a.t()
    return adapter_then_base(inp, base_weight(base, inp.dtype).t(), ia, b.t(), scale), ia


# dh is computed in token chunks above this size (constants.py says why); tests lower it here
DH_CHUNK_BYTES = MLP_DH_CHUNK_BYTES


def _dh_chunk_rows(n_tok: int, width: int, elem: int) -> int:
    return dh_chunk_rows(n_tok, width, elem, DH_CHUNK_BYTES)


def _down_and_glu_backward(d2, d_bd, w_down, adc, sd, e, g, kind, p_ad):
    """From the output gradient d2 to the GLU inputs' gradients, in place of e and g; returns the
    down adapter's A gradient (the only product that needs h, which the GLU backward rebuilds).

    dh = d2 @ W_down + sd * d_bd @ A_down, then (dh, e, g) -> (h, de, dg), one token chunk at a
    time into one reused chunk buffer.
    """
    n_tok, width = e.shape
    rows = _dh_chunk_rows(n_tok, width, e.element_size())
    if rows == n_tok:
        dh = adapter_then_base(d2, w_down, d_bd, adc, sd)
        glu_backward_inplace(dh, e, g, kind)
        return scaled_mm(d_bd.t(), dh, sd, p_ad)
    buf = torch.empty(rows, width, dtype=e.dtype, device=e.device)
    # chunk products add up in fp32: each is rounded once, as the one unchunked product is
    acc = torch.zeros(d_bd.shape[1], width, dtype=torch.float32, device=e.device)
    for start in range(0, n_tok, rows):
        stop = min(n_tok, start + rows)
        dh = adapter_then_base(d2[start:stop], w_down, d_bd[start:stop], adc, sd, out=buf[: stop - start])
        glu_backward_inplace(dh, e[start:stop], g[start:stop], kind)
        acc += d_bd[start:stop].t() @ dh
    return acc.mul_(sd).to(p_ad)


# gate and up are rebuilt in token chunks of this size under checkpointing; tests lower it here
REGATE_CHUNK_BYTES = MLP_REGATE_CHUNK_BYTES


def _regate_rows(n_tok: int, width: int, elem: int) -> int:
    return dh_chunk_rows(n_tok, width, elem, REGATE_CHUNK_BYTES)


def _gate_up_chunk(x, xa_g, xa_u, bases, adapters, scales, e_buf, g_buf):
    """gate and up of one token chunk, into the chunk buffers."""
    gate_base, up_base, _down = bases
    _ag, bgc, _au, buc, _ad, _bd = adapters
    sg, su, _sd = scales
    n, dt = x.shape[0], x.dtype
    e = adapter_then_base(x, base_weight(gate_base, dt).t(), xa_g, bgc.t(), sg, out=e_buf[:n])
    g = adapter_then_base(x, base_weight(up_base, dt).t(), xa_u, buc.t(), su, out=g_buf[:n])
    return e, g


def _down_chunk(h, down_base, ha_d, bdc, sd, out):
    """The down projection of one chunk's h, into `out`, with its rank-r product `ha_d` given."""
    return adapter_then_base(h, base_weight(down_base, h.dtype).t(), ha_d, bdc.t(), sd, out=out)


def _chunked_first_run(x2, xa_g, xa_u, bases, adapters, scales, kind, down: bool = True):
    """A checkpointed layer's run a token chunk at a time: (output, h @ A_down^T).  `down=False`
    (a recomputation whose first run kept nothing) builds only h @ A_down^T: output None."""
    n_tok, width = x2.shape[0], bases[0].out_features
    rows = _regate_rows(n_tok, width, x2.element_size())
    adc, bdc, sd = adapters[4], adapters[5], scales[2]
    out = torch.empty(n_tok, bases[2].out_features, dtype=x2.dtype, device=x2.device) if down else None
    ha_d = torch.empty(n_tok, adc.shape[0], dtype=x2.dtype, device=x2.device)
    e_buf, g_buf = (torch.empty(rows, width, dtype=x2.dtype, device=x2.device) for _ in range(2))
    for start in range(0, n_tok, rows):
        stop = min(n_tok, start + rows)
        e, g = _gate_up_chunk(x2[start:stop], xa_g[start:stop], xa_u[start:stop], bases, adapters, scales, e_buf, g_buf)
        h = glu_forward(e, g, kind)
        torch.mm(h, adc.t(), out=ha_d[start:stop])
        if out is not None:
            _down_chunk(h, bases[2], ha_d[start:stop], bdc, sd, out[start:stop])
    return out, ha_d


def _both_adapters(agc, auc, sg, su):
    """The gate and up adapters' A stacked, with one scale, for both adapters' part of dX in one
    rank-2r product."""
    if sg == su:
        return torch.cat([agc, auc]), sg
    return torch.cat([agc * sg, auc * su]), 1.0


def _chunked_backward(d2, x2, xa_g, xa_u, ha_d, bases, adapters, scales, kind, p_dtypes):
    """Backward of a checkpointed run: gate and up rebuilt a token chunk at a time, each chunk
    taken through dh, the GLU backward and dX; the adapters' gradients add up over the chunks in
    fp32, each chunk product rounded once, as _down_and_glu_backward's are."""
    gate_base, up_base, down_base = bases
    agc, bgc, auc, buc, adc, bdc = adapters
    sg, su, sd = scales
    p_ag, p_bg, p_au, p_bu, p_ad, p_bd = p_dtypes
    n_tok, width, dt = x2.shape[0], gate_base.out_features, x2.dtype
    rows = _regate_rows(n_tok, width, x2.element_size())
    d_bd = d2 @ bdc
    grad_bd = scaled_mm(d2.t(), ha_d, sd, p_bd)
    a_both, s_both = _both_adapters(agc, auc, sg, su)
    e_buf, g_buf, dh_buf = (torch.empty(rows, width, dtype=dt, device=x2.device) for _ in range(3))
    rank = adc.shape[0]
    acc_ad = torch.zeros(rank, width, dtype=torch.float32, device=x2.device)
    acc_bg = torch.zeros(width, agc.shape[0], dtype=torch.float32, device=x2.device)
    acc_bu = torch.zeros(width, auc.shape[0], dtype=torch.float32, device=x2.device)
    deg_b = torch.empty(n_tok, agc.shape[0] + auc.shape[0], dtype=dt, device=x2.device)  # [de @ B_g, dg @ B_u]
    dx = torch.empty_like(x2)
    for start in range(0, n_tok, rows):
        stop = min(n_tok, start + rows)
        e, g = _gate_up_chunk(x2[start:stop], xa_g[start:stop], xa_u[start:stop], bases, adapters, scales, e_buf, g_buf)
        dh = adapter_then_base(
            d2[start:stop], base_weight(down_base, dt), d_bd[start:stop], adc, sd, out=dh_buf[: stop - start]
        )
        glu_backward_inplace(dh, e, g, kind)  # dh -> h, e -> d(gate), g -> d(up)
        acc_ad += d_bd[start:stop].t() @ dh
        acc_bg += e.t() @ xa_g[start:stop]
        acc_bu += g.t() @ xa_u[start:stop]
        torch.mm(e, bgc, out=deg_b[start:stop, : agc.shape[0]])
        torch.mm(g, buc, out=deg_b[start:stop, agc.shape[0] :])
        adapter_then_base(e, base_weight(gate_base, dt), deg_b[start:stop], a_both, s_both, out=dx[start:stop])
        dx[start:stop].addmm_(g, base_weight(up_base, dt))
    grad_ag = scaled_mm(deg_b[:, : agc.shape[0]].t(), x2, sg, p_ag)
    grad_au = scaled_mm(deg_b[:, agc.shape[0] :].t(), x2, su, p_au)
    return (
        dx,
        grad_ag,
        acc_bg.mul_(sg).to(p_bg),
        grad_au,
        acc_bu.mul_(su).to(p_bu),
        acc_ad.mul_(sd).to(p_ad),
        grad_bd,
    )


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ag, bg, au, bu, ad, bd, bases, scales, kind, dtype, run=None):
        # dtypes are managed explicitly (the caller resolved autocast into `dtype`); autocast
        # re-casting single matmuls would break the in-place addmm_ accumulations
        with torch.autocast(device_type=x.device.type, enabled=False):
            return LoRAMLPFunction._forward(ctx, x, ag, bg, au, bu, ad, bd, bases, scales, kind, dtype, run)

    @staticmethod
    def _forward(ctx, x, ag, bg, au, bu, ad, bd, bases, scales, kind, dtype, run):
        gate_base, up_base, down_base = bases
        sg, su, sd = scales
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype).contiguous()
        agc, bgc, auc, buc, adc, bdc = (t.to(dtype) for t in (ag, bg, au, bu, ad, bd))
        ctx.bases, ctx.scales, ctx.kind, ctx.x_shape, ctx.x_dtype = bases, scales, kind, shape, x.dtype
        ctx.p_dtypes = [t.dtype for t in (ag, bg, au, bu, ad, bd)]
        ctx.chunked = run is not None and env_flag(CHUNKED_MLP_ENV, default=False)
        if ctx.chunked:
            # a checkpointed layer: both runs save the same small tensors, no gate or up
            adapters = (agc, bgc, auc, buc, adc, bdc)
            xa_g, xa_u = x2 @ agc.t(), x2 @ auc.t()
            if run.recomputing:
                ha_d = run.kept()
                if ha_d is None:
                    _, ha_d = _chunked_first_run(x2, xa_g, xa_u, bases, adapters, scales, kind, down=False)
                out = torch.empty(x2.shape[0], down_base.out_features, dtype=dtype, device=x2.device)
            else:
                out, ha_d = _chunked_first_run(x2, xa_g, xa_u, bases, adapters, scales, kind)
                run.keep(ha_d)
            ctx.save_for_backward(x2, xa_g, xa_u, ha_d, *adapters)
            return out.view(*shape[:-1], out.shape[-1])
        e, xa_g = _project(x2, gate_base, agc, bgc, sg)
        g, xa_u = _project(x2, up_base, auc, buc, su)
        if run is not None and run.recomputing:
            # a checkpoint's recomputation keeps only what backward saves; the output is thrown
            # away, so its GEMMs (a quarter of the layer's recomputed FLOPs) and, for 4-bit, the
            # down weight's dequantisation are skipped.  The rank-r product h @ A^T comes from the
            # first run when it kept it, and then h is not needed at all (backward rebuilds it).
            ha_d = run.kept()
            if ha_d is None:
                ha_d = glu_forward(e, g, kind) @ adc.t()
            out = torch.empty(x2.shape[0], down_base.out_features, dtype=dtype, device=x2.device)
        else:
            h = glu_forward(e, g, kind)
            out, ha_d = _project(h, down_base, adc, bdc, sd)
            del h  # recomputed in backward
            if run is not None:
                run.keep(ha_d)
        # the compute-dtype adapter copies are tiny; keeping them saves backward six casts
        ctx.save_for_backward(x2, e, g, xa_g, xa_u, ha_d, agc, bgc, auc, buc, adc, bdc)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(device_type=dout.device.type, enabled=False):
            return LoRAMLPFunction._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        if ctx.chunked:
            x2, xa_g, xa_u, ha_d, *adapters = ctx.saved_tensors
            d2 = dout.reshape(-1, dout.shape[-1]).to(x2.dtype)
            dx, *lora_grads = _chunked_backward(
                d2, x2, xa_g, xa_u, ha_d, ctx.bases, adapters, ctx.scales, ctx.kind, ctx.p_dtypes
            )
            grads = (dx.view(ctx.x_shape).to(ctx.x_dtype), *lora_grads, None, None, None, None, None)
            return grads[: len(ctx.needs_input_grad)]
        x2, e, g, xa_g, xa_u, ha_d, agc, bgc, auc, buc, adc, bdc = ctx.saved_tensors
        gate_base, up_base, down_base = ctx.bases
        sg, su, sd = ctx.scales
        dt = e.dtype
        p_ag, p_bg, p_au, p_bu, p_ad, p_bd = ctx.p_dtypes
        d2 = dout.reshape(-1, dout.shape[-1]).to(dt)

        d_bd = d2 @ bdc
        grad_bd = scaled_mm(d2.t(), ha_d, sd, p_bd)
        # e and g are this Function's own buffers (never seen outside): the GLU backward turns
        # them into de and dg in place
        grad_ad = _down_and_glu_backward(d2, d_bd, base_weight(down_base, dt), adc, sd, e, g, ctx.kind, p_ad)
        de, dg = e, g

        de_b = de @ bgc
        grad_bg = scaled_mm(de.t(), xa_g, sg, p_bg)
        grad_ag = scaled_mm(de_b.t(), x2, sg, p_ag)
        dg_b = dg @ buc
        grad_bu = scaled_mm(dg.t(), xa_u, su, p_bu)
        grad_au = scaled_mm(dg_b.t(), x2, su, p_au)

        # both adapters' part of dX in one rank-2r product, then both base GEMMs add into it
        a_both, s_both = _both_adapters(agc, auc, sg, su)
        dx = adapter_then_base(de, base_weight(gate_base, dt), torch.cat([de_b, dg_b], dim=1), a_both, s_both)
        dx.addmm_(dg, base_weight(up_base, dt))

        grads = (
            dx.view(ctx.x_shape).to(ctx.x_dtype),
            grad_ag,
            grad_bg,
            grad_au,
            grad_bu,
            grad_ad,
            grad_bd,
            None,
            None,
            None,
            None,
            None,
        )
        return grads[: len(ctx.needs_input_grad)]  # `run` may be left out


def lora_mlp(x, gate, up, down, kind: int, adapter: str, run=None):
    """Run a gated MLP whose gate/up/down are PEFT LoRA layers (one adapter, no dropout/DoRA/bias).

    `run`: the checkpointed layer run this call is part of (recompute.LayerRun), or None; its
    recomputation skips the down projection and takes the first run's h @ A_down^T back."""
    dev = x.device.type
    # under autocast the stock layers would compute in the autocast dtype; so do we
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else compute_dtype(gate.base_layer, x)
    (ag, bg, sg), (au, bu, su), (ad, bd, sd) = (compat.lora_weights(m, adapter) for m in (gate, up, down))
    return LoRAMLPFunction.apply(
        x,
        ag,
        bg,
        au,
        bu,
        ad,
        bd,
        (gate.base_layer, up.base_layer, down.base_layer),
        (sg, su, sd),
        kind,
        dtype,
        run,
    )
