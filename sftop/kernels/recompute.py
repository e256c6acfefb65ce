"""Tell a layer whether it runs for real or as a checkpoint's recomputation.

Under (non-reentrant) gradient checkpointing each decoder layer runs twice: once in the forward
pass, whose output feeds the next layer, and again in the backward pass, where only the tensors
that autograd saves matter and the output is thrown away.  Some work is needed only for that
output.  The clearest case is the MLP's down projection: backward needs its input (for the LoRA
gradients) but never its output, and its base GEMM is about a quarter of a layer's recomputed
FLOPs.  Kernels ask `recomputing()` and skip such work.

`checkpoint_marking_recompute` wraps the function handed to torch.utils.checkpoint so that every
call after the first (the recomputations, which run inside backward, possibly on autograd's worker
thread) runs with the mark set.  The mark is thread-local, so a forward on another thread is never
mistaken for a recomputation.

A layer's first run can also hand tensors to its recomputation (`keep_for_recompute`,
`kept_from_first_run`), so that the recomputation need not rebuild them.  Small ones stay on the
GPU: the MLP's rank-r product h @ A_down^T ([tokens, r]) needs the activation h ([tokens,
intermediate]), whose GLU pass and read cost about 2 % of a 1B step.  Large ones go to host memory
with the layer's input when the checkpoint offloads (`in_offloading_checkpoint()`): the attention output,
which spares the recomputation the attention forward kernel (kept_attention.py), and on wide
enough layers the attention's q, k and v (`KeptProjections`), which spare it the q/k/v
projections and RoPE: the recomputation hands on `placeholder`s in their place.  Kept tensors
belong to one checkpoint call (the closure torch holds until its backward is done) and come back
in the order they were kept, because the recomputation runs the same code as the first run.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed for backward (its outputs are discarded)."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def marked_as_recompute():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        # also on torch's early-stop exception, which ends a recomputation once all it must
        # restore has been saved
        _state.depth -= 1


class _Kept:
    """What one checkpoint call's first run kept, and how far its current recomputation has read."""

    __slots__ = ("tensors", "read", "offload")

    def __init__(self, offload=None):
        self.tensors: list = []
        self.read: int | None = None  # None while the first run keeps; an index while a recomputation reads
        self.offload = offload  # the checkpoint's offload hooks (pack/unpack), or None


class _OffloadedKeep:
    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def keep_for_recompute(tensor, offload: bool = False) -> None:
    """In the first run of a layer under `checkpoint_marking_recompute`, keep `tensor` for the
    layer's recomputation; anywhere else, do nothing.  Kept tensors stay on the GPU until the
    layer's backward is done, so keep only small ones there; with `offload=True` the tensor goes
    to pinned host memory the way the layer's input does (only where `in_offloading_checkpoint()`:
    check that first)."""
    kept = getattr(_state, "kept", None)
    if kept is None or kept.read is not None:
        return
    if offload:
        if kept.offload is None:
            raise RuntimeError("keep_for_recompute(offload=True) outside an offloading checkpoint")
        tensor = _OffloadedKeep(kept.offload.pack(tensor))
    kept.tensors.append(tensor)


def in_offloading_checkpoint() -> bool:
    """True in both runs of a layer whose checkpoint offloads its saved input: there the first run
    may `keep_for_recompute(t, offload=True)`.  The same in the first run and the recomputation,
    so code can decide by it whether to keep, and whether to read back, in the same order."""
    kept = getattr(_state, "kept", None)
    return kept is not None and kept.offload is not None


class LayerRun:
    """Which run of a checkpointed layer a kernel is part of, handed to it by the patcher
    (`current_layer_run`), so that the kernel itself reads no scheduling state: whether this is
    the recomputation, and the first run's kept tensors, in order."""

    __slots__ = ("recomputing",)

    def __init__(self, recomputing: bool):
        self.recomputing = recomputing

    def keep(self, tensor, offload: bool = False) -> None:
        keep_for_recompute(tensor, offload)

    def kept(self):
        return kept_from_first_run()


_FIRST_RUN, _RECOMPUTATION = LayerRun(False), LayerRun(True)


def current_layer_run() -> LayerRun | None:
    """Inside a layer run by `checkpoint_marking_recompute` (this thread): its first run or its
    recomputation.  None elsewhere."""
    if recomputing():
        return _RECOMPUTATION
    return _FIRST_RUN if getattr(_state, "kept", None) is not None else None


class KeptProjections:
    """The q, k and v one attention call received in a layer's first run, in pinned host memory,
    for the recomputation's q/k/v projections and RoPE to hand on instead of computing them.

    The projections open one per call (`open_kept_projections`), before the attention has run;
    the attention fills it (`fill`) when it keeps its own output too, and reads it back in the
    recomputation (`take`).  An empty one means the first run's attention kept nothing, and the
    recomputation computes q/k/v as usual.
    """

    __slots__ = ("packed", "_hooks")

    def __init__(self, hooks):
        self.packed: list | None = None
        self._hooks = hooks

    @property
    def filled(self) -> bool:
        return self.packed is not None

    def fill(self, *tensors) -> None:
        # late: the recomputation reads them only at its attention, so the copy back may wait
        # until the next layer's MLP backward (its peak) has freed its buffers
        self.packed = [self._hooks.pack(t, late=True) for t in tensors]

    def take(self) -> list:
        assert self.packed is not None, "take() before fill()"
        return [self._hooks.unpack(p) for p in self.packed]

    @staticmethod
    def placeholder(shape, dtype, device) -> torch.Tensor:
        """What the projections hand on for an output the recomputation does not compute."""
        return placeholder(shape, dtype, device)


def open_kept_projections() -> KeptProjections | None:
    """Inside an offloading checkpoint: in the first run a new, empty holder, kept for the
    recomputation; in the recomputation the first run's one.  It is also left for the next
    attention call of this thread (`take_open_projections`).  Elsewhere None."""
    kept = getattr(_state, "kept", None)
    if kept is None or kept.offload is None:
        return None
    if kept.read is None:
        holder = KeptProjections(kept.offload)
        kept.tensors.append(holder)
    else:
        holder = kept_from_first_run()
        if not isinstance(holder, KeptProjections):
            raise RuntimeError(
                "sftop: a layer's recomputation read its kept tensors out of its first run's order (the two "
                "runs took different paths). Set SFTOP_KEEP_PROJECTIONS=0 to train without keeping q/k/v, "
                "and report the model family."
            )
    _state.open_projections = holder
    return holder


def take_open_projections() -> KeptProjections | None:
    """The holder the last q/k/v projections of this thread opened, once (then it is gone)."""
    holder = getattr(_state, "open_projections", None)
    _state.open_projections = None
    return holder


class _PlaceholderBuffers:
    """The one-element NaN buffers every placeholder is a view of, one per dtype and device.

    A placeholder is known by the buffer it views, which this module alone hands out: its views
    (reshape, transpose, the attention's [B, H, T, D] layout) still share that storage, while
    anything computed from it, however it is laid out, has storage of its own.  So the attention
    can refuse q/k/v that something between the projections and it computed on the placeholders
    (their gradients would be wrong), and a real tensor that happens to be a broadcast (all
    strides 0) is never taken for one.  The buffers are kept for the process's life (a few bytes),
    so their memory is never reused by another tensor.
    """

    def __init__(self):
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def view(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        device = torch.device(device)
        if device.index is None and device.type != "cpu":
            device = torch.empty(0, device=device).device  # "cuda": the current one, as tensors name it
        buffer = self._buffers.get((dtype, device))
        if buffer is None:
            # made in the eager warm-up runs before any CUDA graph capture of the same code;
            # setdefault: of two threads making the first one, both use the one that was kept
            buffer = self._buffers.setdefault(
                (dtype, device), torch.full((1,), float("nan"), dtype=dtype, device=device)
            )
        return buffer.expand(shape)

    def knows(self, t: torch.Tensor) -> bool:
        buffer = self._buffers.get((t.dtype, t.device))
        return buffer is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


_PLACEHOLDERS = _PlaceholderBuffers()


def placeholder(shape, dtype, device) -> torch.Tensor:
    """What a recomputation hands on in place of a tensor it did not compute: the right shape and
    dtype for autograd over one NaN element of memory, so that any computation that reads it by
    mistake is poisoned rather than quietly wrong."""
    return _PLACEHOLDERS.view(shape, dtype, device)


def is_placeholder(t: torch.Tensor) -> bool:
    """True for a `placeholder` and its views; False for anything computed, even from one."""
    return _PLACEHOLDERS.knows(t)


class _RoPEOnPlaceholders(torch.autograd.Function):
    """RoPE in a recomputation whose q/k projections handed on placeholders: the attention takes
    the first run's rotated q/k back (KeptProjections), so the forward hands placeholders on and
    only the backward's rotation runs."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return placeholder(q.shape, q.dtype, q.device), placeholder(k.shape, k.dtype, k.device)

    @staticmethod
    def backward(ctx, dq, dk):
        from .rope import rotate_back

        cos, sin = ctx.saved_tensors
        if ctx.unsqueeze_dim == 2:  # [B,T,H,D]: the kernel takes [B,H,T,D] views
            dqi, dki = rotate_back(dq.transpose(1, 2), dk.transpose(1, 2), cos, sin)
            return dqi.transpose(1, 2), dki.transpose(1, 2), None, None, None
        dqi, dki = rotate_back(dq, dk, cos, sin)
        return dqi, dki, None, None, None


def rope_on_placeholders(q, k, cos, sin, unsqueeze_dim: int = 1):
    """What the fused RoPE hands on when q and k are both placeholders (`is_placeholder`), with
    the signature of rope.apply_rope."""
    return _RoPEOnPlaceholders.apply(q, k, cos, sin, unsqueeze_dim)


def kept_from_first_run():
    """In a recomputation, the next tensor its first run kept (the same order); otherwise None."""
    kept = getattr(_state, "kept", None)
    if kept is None or kept.read is None or kept.read >= len(kept.tensors):
        return None
    kept.read += 1
    item = kept.tensors[kept.read - 1]
    return kept.offload.unpack(item.packed) if isinstance(item, _OffloadedKeep) else item


@contextmanager
def _keeping(kept: _Kept, reading: bool):
    previous = getattr(_state, "kept", None)
    _state.kept = kept
    kept.read = 0 if reading else None
    try:
        yield
    finally:
        _state.kept = previous
        _state.open_projections = None  # a holder never outlives its layer call


def checkpoint_marking_recompute(function, *args, _checkpoint=checkpoint, _offload=None, **kwargs):
    """`_checkpoint(function, *args, **kwargs)` whose recomputations run under `recomputing()` and
    read what the first run kept.  `_offload`: an object with pack(tensor) -> handle and
    unpack(handle) -> tensor (the checkpoint's offload hooks), for `keep_for_recompute(offload=True)`."""
    calls = 0
    kept = _Kept(_offload)

    def run(*a, **k):
        nonlocal calls
        calls += 1
        if calls == 1:
            with _keeping(kept, reading=False):
                out = function(*a, **k)
            settle = getattr(_offload, "settle", None)
            if settle is not None:
                settle()  # what this layer moved to host is not held on the GPU past it
            return out
        with marked_as_recompute(), _keeping(kept, reading=True):
            return function(*a, **k)

    return _checkpoint(run, *args, **kwargs)
