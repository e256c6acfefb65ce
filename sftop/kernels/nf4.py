"""4-bit (NF4/FP4) base weights, dequantised by bitsandbytes' own CUDA kernels into one reused
scratch buffer per device.

Why not `bitsandbytes.functional.dequantize_4bit`: a QLoRA step dequantises every projection three
times (forward, checkpoint recompute, backward), 336 calls per step for a 16-layer Llama.  Each
call goes through torch's custom-op dispatcher, a second dispatched call for the double-quantised
absmax and a fresh allocation; on an H200 that host work left the GPU idle for a third of the step
(docs/benchmarks.md, 2026-12-02).  Here each weight's call is resolved once (which C function,
sizes, nested statistics) and later calls go straight to the same C entry points bitsandbytes'
CUDA backend uses, writing into a scratch buffer that is reused for every weight.  The maths is
bitsandbytes' own: nothing is re-implemented, and the GPU tests check the result bit for bit
against `dequantize_4bit`.

The scratch buffer holds ONE weight at a time: the tensor returned is valid until the next
dequantisation on that device, so callers must consume it (enqueue their GEMM) before asking for
another weight.  Every caller in sftop.kernels does.  Stream order keeps that safe on the GPU: the
next dequantisation is queued after the GEMM that reads the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import compat
from .scratch import ScratchBuffers

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


SCRATCH = ScratchBuffers()
# the dequantised absmax of a double-quantised weight (fp32, numel / blocksize values) gets its own
# scratch so that it can be written while the weight scratch is still being read
ABSMAX_SCRATCH = ScratchBuffers()


@dataclass(frozen=True)
class _Plan:
    """Everything one weight's dequantisation needs, resolved once."""

    weight_fn: Callable[..., Any]  # ctypes function: (code, A, absmax, out, blocksize, n, stream)
    dtype: torch.dtype  # the weight's own dtype, what bitsandbytes dequantises into
    shape: torch.Size
    numel: int
    blocksize: int
    nested: bool
    absmax_fn: Callable[..., Any] | None  # fp32 blockwise dequantisation of the nested absmax
    absmax_numel: int
    absmax_blocksize: int


_PLAN = "_sftop_plan"


def _plan_for(weight: Any) -> _Plan | None:  # a bitsandbytes Params4bit
    """The direct call for `weight`, or None when bitsandbytes' Python API must be used."""
    qs = weight.quant_state
    if _PLAN not in qs.__dict__:
        qs.__dict__[_PLAN] = _resolve(weight, qs)
    return qs.__dict__[_PLAN]


def _resolve(weight: torch.Tensor, qs) -> _Plan | None:
    dtype = qs.dtype
    if not weight.is_cuda or dtype not in _DTYPE_NAMES or not weight.is_contiguous():
        return None
    if qs.quant_type not in ("nf4", "fp4") or qs.blocksize not in _BLOCKSIZES:
        return None
    lib = compat.bnb_cuda_library()
    if lib is None:
        return None
    weight_fn = compat.bnb_c_function(lib, compat.bnb_dequantize_symbol(_DTYPE_NAMES[dtype], qs.quant_type))
    if weight_fn is None:
        return None
    shape = torch.Size(qs.shape)
    if qs.absmax is None or not qs.absmax.is_cuda:
        return None
    absmax_fn, absmax_numel, absmax_blocksize = None, 0, 0
    if qs.nested:
        s2 = qs.state2
        if s2 is None or s2.code is None or not s2.code.is_cuda or s2.blocksize not in _BLOCKSIZES:
            return None
        if qs.absmax.dtype != torch.uint8 or s2.absmax.dtype != torch.float32 or s2.code.dtype != torch.float32:
            return None
        absmax_fn = compat.bnb_c_function(lib, compat.bnb_dequantize_symbol("fp32"))
        if absmax_fn is None:
            return None
        absmax_numel, absmax_blocksize = qs.absmax.numel(), int(s2.blocksize)
    elif qs.absmax.dtype != torch.float32:
        return None
    return _Plan(
        weight_fn,
        dtype,
        shape,
        shape.numel(),
        int(qs.blocksize),
        bool(qs.nested),
        absmax_fn,
        absmax_numel,
        absmax_blocksize,
    )


def _dequantize_direct(weight: Any, plan: _Plan) -> torch.Tensor:
    qs = weight.quant_state
    device = weight.device
    stream = compat.cuda_raw_stream(device.index)
    absmax = qs.absmax
    if plan.absmax_fn is not None:  # nested (double-quantised) statistics
        s2 = qs.state2
        absmax = ABSMAX_SCRATCH.get(device, torch.float32, plan.absmax_numel)
        plan.absmax_fn(
            s2.code.data_ptr(),
            qs.absmax.data_ptr(),
            s2.absmax.data_ptr(),
            absmax.data_ptr(),
            plan.absmax_blocksize,
            plan.absmax_numel,
            stream,
        )
        absmax.add_(qs.offset)
    out = SCRATCH.get(device, plan.dtype, plan.numel)
    plan.weight_fn(None, weight.data_ptr(), absmax.data_ptr(), out.data_ptr(), plan.blocksize, plan.numel, stream)
    return out.view(plan.shape)


def dequantize_4bit_weight(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight of a bitsandbytes 4-bit Params4bit, in `dtype`.

    On a CUDA device the result lives in the shared scratch buffer (valid until the next call for
    that device and dtype); elsewhere it is bitsandbytes' own fresh tensor.  Either way it is
    dequantised to the weight's own dtype first, as bitsandbytes' layers do, and only then cast:
    dequantising straight to fp32 would skip that rounding and differ from the stock path.
    """
    plan = _plan_for(weight)
    if plan is not None and weight.device.index == torch.cuda.current_device():
        w = _dequantize_direct(weight, plan)
    else:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return w if w.dtype == dtype else w.to(dtype)
