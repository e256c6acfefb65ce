"""Offloaded gradient checkpointing whose copies overlap the compute.

With checkpointing on, each decoder layer keeps only its input for the backward pass (one
[tokens, hidden] tensor per layer, 0.5 GiB for a 16-layer 2048-wide model at 8K tokens).  Offloading
moves those inputs to pinned host memory.  transformers' own `offload=True` wraps the checkpoint in
`torch.autograd.graph.save_on_cpu`, which copies on the compute stream and blocks the host on every
copy: on an H200 it cost a quarter of the step (docs/benchmarks.md, 2026-12-02).

Here:
  * forward: each saved layer input is copied to pinned memory on a side stream, after an event
    on the compute stream, so the next layers keep computing while it copies.  The GPU block is
    handed back to the allocator only when that copy is done (`record_stream`).
  * backward: when a layer's input comes back (the start of its recomputation), the input saved
    just before it -- the next one backward will ask for -- is already being copied back on a
    second side stream, so it is on the GPU by the time its recomputation starts.
Only the first layer backward reaches waits for a copy.  Tensors below `min_bytes` (and anything
off the GPU) are left where they are: copying them costs more than it frees.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

# a layer input is tokens x hidden x 2 bytes (megabytes); rotary tables and masks are smaller
# and shared by every layer, so moving them would free nothing
DEFAULT_MIN_BYTES = 1 << 20


class _Offloaded:
    """One saved tensor in pinned host memory, and its copy back to the GPU when one is under way."""

    __slots__ = ("host", "device", "saved", "prev", "fetched", "fetch_done", "__weakref__")

    def __init__(self, host, device, saved, prev):
        self.host = host
        self.device = device
        self.saved = saved  # event: the copy to host is complete
        self.prev = prev  # weakref to the entry saved just before this one
        self.fetched = None  # GPU tensor being copied back ahead of time
        self.fetch_done = None


class OverlappedOffload(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that keep large saved tensors in pinned memory, copying on side streams."""

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES, prefetch: bool = True):
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self._last = None
        super().__init__(self._pack, self._unpack)

    # one pair of side streams per device, shared by every instance (streams are a limited resource)
    _streams: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}

    @classmethod
    def _side_streams(cls, device: torch.device):
        pair = cls._streams.get(device.index)
        if pair is None:
            pair = cls._streams[device.index] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return pair

    def _pack(self, t: torch.Tensor):
        if not t.is_cuda or t.numel() * t.element_size() < self.min_bytes:
            return t
        to_host, _ = self._side_streams(t.device)
        compute = torch.cuda.current_stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        to_host.wait_stream(compute)  # t is complete once the work queued so far is
        with torch.cuda.stream(to_host):
            host.copy_(t, non_blocking=True)
            saved = torch.cuda.Event()
            saved.record(to_host)
        t.record_stream(to_host)  # its memory is not reused before the copy has read it
        prev = self._last() if self._last is not None else None
        entry = _Offloaded(host, t.device, saved, weakref.ref(prev) if prev is not None else None)
        self._last = weakref.ref(entry)
        return entry

    def _unpack(self, entry):
        if isinstance(entry, torch.Tensor):
            return entry
        compute = torch.cuda.current_stream(entry.device)
        if entry.fetched is not None:
            t, entry.fetched = entry.fetched, None
            compute.wait_event(entry.fetch_done)
            t.record_stream(compute)
        else:
            compute.wait_event(entry.saved)
            t = entry.host.to(entry.device, non_blocking=True)
        prev = entry.prev() if entry.prev is not None else None
        if self.prefetch and prev is not None and prev.fetched is None:
            self._fetch_ahead(prev)
        return t

    def _fetch_ahead(self, entry: _Offloaded) -> None:
        _, to_device = self._side_streams(entry.device)
        to_device.wait_event(entry.saved)
        with torch.cuda.stream(to_device):
            # allocated on the side stream: its block cannot be one the compute stream still uses
            t = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
            t.copy_(entry.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(to_device)
        entry.fetched, entry.fetch_done = t, done


def offloaded_checkpoint(function, *args, _offload: OverlappedOffload | None = None, **kwargs):
    """torch.utils.checkpoint.checkpoint with the checkpoint's saved inputs offloaded."""
    with _offload if _offload is not None else OverlappedOffload():
        return checkpoint(function, *args, **kwargs)


def checkpoint_function(gradient_checkpointing_kwargs: dict | None = None, **offload_kwargs):
    """A `_gradient_checkpointing_func` for transformers' checkpointed layers.

    One hooks object serves every layer, so each saved input knows the one saved before it.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
    if kwargs.get("use_reentrant", True):
        # reentrant checkpointing saves nothing through autograd's hooks: nothing would move
        raise ValueError("offloaded checkpointing needs use_reentrant=False")
    hooks = OverlappedOffload(**offload_kwargs)
    return functools.partial(offloaded_checkpoint, _offload=hooks, **kwargs)
