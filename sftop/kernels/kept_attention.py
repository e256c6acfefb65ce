"""Causal attention whose checkpoint recomputation reuses the first run's output.

Under lean recomputation (recompute.py) a checkpointed layer's second run exists only to rebuild
what its backward reads.  For attention that is Q, K and V (from the q/k/v GEMMs and RoPE) and
the forward kernel's output and log-sum-exp, so the recomputation ran the whole attention forward
again: half of the attention forward time of a step (3.2 ms of a 124 ms 1B step, 5 ms of a 323 ms
8B step on an H200, docs/benchmarks.md).  When the checkpoint offloads its input, the first run
now keeps the output ([batch, tokens, heads, head_dim], the size of a layer input) in pinned host
memory next to that input, and the log-sum-exp ([batch, heads, tokens] fp32, 1/64 of that) on
the GPU; the recomputation takes both back and skips the kernel.  The backward is then the same
kernel's own backward with the same inputs as without checkpointing.  Without offload the output
would stay on the GPU (a layer input's worth per layer), so the path is used only with it.

On layers with compute enough to hide the extra copies (`projections_worth_keeping`), the first
run also moves the q, k and v it was handed (after RoPE) to host memory, into the holder the
layer's q/k/v projections opened (recompute.KeptProjections).  The recomputation's projections
and RoPE then hand on placeholders, and this Function takes the real q/k/v back instead.

The kernels are PyTorch's own fused attention ops, called directly so that the output and the
log-sum-exp can be kept: cuDNN's on the GPU (what SDPA itself dispatches to for these shapes on
Hopper, with K/V heads shared by query-head groups natively) and the CPU flash pair on the CPU,
where the tests run.  Used for causal self-attention without a mask, dropout or softcapping only.
"""

from __future__ import annotations

import torch

# whether a layer keeps q/k/v too is decided by constants.projections_worth_keeping
from .constants import KEEP_PROJECTIONS_ENV as ENV_SWITCH
from .recompute import (
    in_offloading_checkpoint,
    is_placeholder,
    keep_for_recompute,
    kept_from_first_run,
    recomputing,
    take_open_projections,
)

_aten = torch.ops.aten


def supported(query: torch.Tensor) -> tuple[bool, str]:
    """Whether the kept path has a kernel for this query (device, dtype, head size)."""
    if query.device.type == "cpu":
        return (
            (True, "")
            if query.dtype in (torch.float32, torch.float64, torch.bfloat16)
            else (False, f"{query.dtype} on the CPU")
        )
    if query.device.type != "cuda":
        return False, f"{query.device.type} device"
    if query.dtype not in (torch.bfloat16, torch.float16):
        return False, f"{query.dtype} (cuDNN attention needs bf16 or fp16)"
    major, _minor = torch.cuda.get_device_capability(query.device)
    # SDPA itself prefers cuDNN only from Hopper on; elsewhere its choice is kept
    if major < 9 or not torch.backends.cuda.cudnn_sdp_enabled():
        return False, "cuDNN attention is SDPA's choice only on Hopper (sm90) and newer"
    if query.shape[-1] > 128 or query.shape[-1] % 8:
        return False, f"head size {query.shape[-1]}"
    return True, ""


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _forward(q, k, v, scale):
    """(output [B, H, T, D], state the backward needs)."""
    if q.is_cuda:
        res = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        out, lse, _cq, _ck, max_q, max_k, seed, offset = res[:8]
        return out, (lse, seed, offset, max_q, max_k)
    groups = q.shape[1] // k.shape[1]
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), 0.0, True, scale=scale
    )
    return out, (lse,)


def _backward(grad, q, k, v, out, state, scale):
    if q.is_cuda:
        lse, seed, offset, max_q, max_k = state
        return _aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, None, None, max_q, max_k, 0.0, True, scale=scale
        )
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, _repeat_kv(k, groups), _repeat_kv(v, groups), out, state[0], 0.0, True, scale=scale
    )
    if groups > 1:  # each K/V head served `groups` query heads: their gradients add up
        b, h, t, d = dk.shape
        dk = dk.view(b, h // groups, groups, t, d).sum(2)
        dv = dv.view(b, h // groups, groups, t, d).sum(2)
    return dq, dk, dv


class KeptAttentionFunction(torch.autograd.Function):
    """Causal attention (q [B, Hq, T, D], k/v [B, Hkv, T, D]) that keeps its output for the
    layer's recomputation inside an offloading checkpoint, and takes it back there."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        kept = in_offloading_checkpoint()
        # the q/k/v projections of this layer may have opened a holder for their outputs
        projections = take_open_projections() if kept else None
        if kept and recomputing():
            if projections is not None and projections.filled:
                if not all(is_placeholder(t) for t in (q, k, v)):
                    raise RuntimeError(
                        "sftop: attention got computed q/k/v where the recomputation handed on placeholders "
                        "(something between the projections and attention computes on them; its gradients "
                        f"would be wrong). Set {ENV_SWITCH}=0 to train without keeping q/k/v, and report the model "
                        "family."
                    )
                q, k, v = (t.transpose(1, 2) for t in projections.take())
            out, state = kept_from_first_run().transpose(1, 2), kept_from_first_run()
        else:
            out, state = _forward(q, k, v, scale)
            if kept:
                if projections is not None:
                    # [B, T, H, D] memory order, like the output below: moved without a layout change
                    projections.fill(*(t.transpose(1, 2) for t in (q, k, v)))
                # [B, T, H, D] is the output's memory order (cuDNN matches the query's, which HF
                # lays out so): contiguous, so it moves to host and back without a layout change
                keep_for_recompute(out.transpose(1, 2), offload=True)
                keep_for_recompute(state)
        if any(is_placeholder(t) for t in (q, k, v)):
            raise RuntimeError(
                "sftop: attention was handed placeholders for q/k/v that no kept tensors replace (the first run "
                f"kept none). Set {ENV_SWITCH}=0 to train without keeping q/k/v, and report the model family."
            )
        ctx.save_for_backward(q, k, v, out)
        ctx.state, ctx.scale = state, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        if grad.stride() != out.stride():
            grad = torch.empty_like(out).copy_(grad)  # the kernel reads both in one layout
        dq, dk, dv = _backward(grad, q, k, v, out, ctx.state, ctx.scale)
        return dq, dk, dv, None


def applies(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """Whether this attention call takes the kept path: inside an offloading checkpoint (so the
    first run and its recomputation decide alike), causal self-attention without a mask, dropout,
    softcapping or sliding window, on a supported kernel."""
    if not in_offloading_checkpoint():
        return False
    if attention_mask is not None or dropout or query.shape[2] != key.shape[2] or query.shape[1] % key.shape[1]:
        return False
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal", True) is False:
        return False
    if kwargs.get("softcap") or kwargs.get("sliding_window") or kwargs.get("position_bias") is not None:
        return False
    return supported(query)[0]


def kept_attention(query, key, value, scale) -> torch.Tensor:
    """transformers' attention output layout [B, T, H, D] from q [B, Hq, T, D], k/v [B, Hkv, T, D]."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    out = KeptAttentionFunction.apply(query, key, value, float(scale))
    return out.transpose(1, 2).contiguous()
