"""Offloaded gradient checkpointing whose copies overlap the compute, eagerly and inside CUDA graphs.

With checkpointing on, each decoder layer keeps only its input for the backward pass (one
[tokens, hidden] tensor per layer, 0.5 GiB for a 16-layer 2048-wide model at 8K tokens).  Offloading
moves those inputs to pinned host memory.  transformers' own `offload=True` wraps the checkpoint in
`torch.autograd.graph.save_on_cpu`, which copies on the compute stream and blocks the host on every
copy: on an H200 it cost a quarter of the step (docs/benchmarks.md, 2026-12-02).

Here:
  * forward: each saved layer input is copied to pinned memory on a side stream, after an event
    on the compute stream, so the next layers keep computing while it copies.  Eagerly the GPU
    block goes back to the allocator at once, marked with `record_stream` so that it is not reused
    before the copy has read it.  Inside a CUDA-graph capture a block with a recorded side-stream
    use is never reused, so nothing would be saved: there the GPU tensors are let go when the next
    layer input is saved (or the capture calls `settle_pending`), after the compute stream has
    waited for their copies.  Tensors a layer keeps for its recomputation (`pack`) wait with its
    input until then, so that the compute stream never waits on a copy in the middle of a layer.
  * backward: when a layer's input comes back (the start of its recomputation), the input saved
    just before it -- the next one backward will ask for -- is already being copied back on a
    second side stream, so it is on the GPU by the time its recomputation starts.  A layer that
    also offloads kept tensors (recompute.keep_for_recompute, KeptProjections) has more entries;
    each unpack then starts the copy of the latest earlier entry not yet used or under way.  Late
    entries (the kept q/k/v, read only at the recomputation's attention) wait until the MLP
    backward of the layer after them has freed its buffers (`fetch_deferred`, from the RMSNorm
    backward that follows it): that is a layer's memory peak, and they would otherwise sit
    through it.
  * pinned buffers: eagerly, fresh ones from torch's caching host allocator.  Inside a capture no
    host memory may be allocated, and a replay writes the same buffers every time, so the capture
    takes buffers reserved beforehand (`recording_offloads` during the warm-up run lists what a
    step offloads; `reserve_host_buffers` pins them; `offloading_into` hands them out in order).
Only the first layer backward reaches waits for a copy.  Tensors below `min_bytes`, anything off the
GPU, and tensors that need no gradient are left where they are.  The last are the rotary tables and
masks every layer is handed: one tensor shared by all layers, so moving it frees nothing, and its
entries would sit between the layer inputs, where backward asks for them in another order than
the one-ahead prefetch assumes.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

# a layer input is tokens x hidden x 2 bytes (megabytes); rotary tables and masks are smaller
# and shared by every layer, so moving them would free nothing
DEFAULT_MIN_BYTES = 1 << 20


class _Offloaded:
    """One saved tensor in pinned host memory, and its copy back to the GPU when one is under way."""

    __slots__ = (
        "host",
        "device",
        "saved",
        "prev",
        "fetched",
        "fetch_done",
        "fetch_stream",
        "used",
        "late",
        "deferred",
        "__weakref__",
    )

    def __init__(self, host, device, saved, prev, late=False):
        self.host = host
        self.device = device
        self.saved = saved  # event: the copy to host is complete (None once the compute stream waited)
        self.prev = prev  # weakref to the entry saved just before this one
        self.fetched = None  # GPU tensor being copied back ahead of time
        self.fetch_done = None
        self.fetch_stream = None
        self.used = False  # unpacked at least once: never worth fetching ahead again
        self.late = late  # fetched ahead only at `fetch_deferred` (see OverlappedOffload.pack)
        self.deferred = False  # waiting for that

    def __del__(self):
        if self.fetched is not None:
            # fetched ahead but never asked for (a backward that stopped early): its block goes
            # back to the compute stream, so keep it from reuse until the side-stream copy is done
            self.fetched.record_stream(self.fetch_stream)


class _HostBufferPlan:
    """Where packs get pinned host buffers: see the module docstring."""

    def __init__(self):
        self.recorded: list | None = None
        self.reserved: list | None = None
        self.taken = 0

    def buffer_for(self, t: torch.Tensor) -> torch.Tensor:
        if self.reserved is not None:
            if self.taken >= len(self.reserved):
                raise RuntimeError("sftop offload: the captured step offloads more tensors than its warm-up run did")
            host = self.reserved[self.taken]
            if host.shape != t.shape or host.dtype != t.dtype:
                raise RuntimeError("sftop offload: the captured step offloads other tensors than its warm-up run did")
            self.taken += 1
            return host
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("sftop offload: inside a CUDA graph capture the host buffers must be reserved first")
        if self.recorded is not None:
            self.recorded.append((tuple(t.shape), t.dtype))
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


_PLAN = _HostBufferPlan()
_LIVE: weakref.WeakSet = weakref.WeakSet()  # hooks objects, for settle_pending


@contextlib.contextmanager
def recording_offloads():
    """Yields a list that fills with the (shape, dtype) of every tensor offloaded meanwhile."""
    _PLAN.recorded = []
    try:
        yield _PLAN.recorded
    finally:
        _PLAN.recorded = None


def reserve_host_buffers(shapes) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=dtype, pin_memory=True) for shape, dtype in shapes]


@contextlib.contextmanager
def offloading_into(buffers: list[torch.Tensor]):
    """Offloads made meanwhile (a capture) go, in order, into `buffers`; all must be used."""
    _PLAN.reserved, _PLAN.taken = buffers, 0
    try:
        yield
        if _PLAN.taken != len(buffers):
            raise RuntimeError("sftop offload: the captured step offloads fewer tensors than its warm-up run did")
    finally:
        _PLAN.reserved, _PLAN.taken = None, 0


def settle_pending() -> None:
    """Make the current stream wait for every forward copy still under way and let go of the GPU
    tensors being copied.  A capture must call this before it ends (all side-stream work joined)."""
    for hooks in list(_LIVE):
        hooks._settle(torch.cuda.current_stream())


def fetch_deferred() -> None:
    """A layer's MLP backward is over and its buffers freed: start fetching what the layer before
    it kept late (called from the RMSNorm backward; a no-op when nothing waits)."""
    for hooks in list(_LIVE):
        if hooks._deferred:
            hooks.fetch_deferred()


def discard_pending() -> None:
    """After a failed capture: forget copies that belonged to it (their events were never recorded)."""
    for hooks in list(_LIVE):
        hooks._pending = []


class OverlappedOffload(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that keep large saved tensors in pinned memory, copying on side streams."""

    def __init__(self, min_bytes: int | None = None, prefetch: bool = True):
        self.min_bytes = DEFAULT_MIN_BYTES if min_bytes is None else min_bytes
        self.prefetch = prefetch
        self._last: weakref.ref[_Offloaded] | None = None
        self._pending: list[tuple[torch.Tensor, _Offloaded]] = []  # under capture: until the compute stream waits
        self._deferred: list[_Offloaded] = []  # late entries whose fetch ahead waits for `fetch_deferred`
        _LIVE.add(self)
        super().__init__(self._pack, self._unpack)

    def graph_key(self) -> tuple:
        """What a CUDA graph's key holds of these hooks: the settings that change what a captured
        step offloads (patching/graph_checks.checkpoint_key), not the object, which every
        `gradient_checkpointing_enable` call makes anew."""
        return (type(self).__qualname__, self.min_bytes, self.prefetch)

    # one pair of side streams per device, shared by every instance (streams are a limited resource)
    _streams: dict[int, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}

    @classmethod
    def _side_streams(cls, device: torch.device):
        pair = cls._streams.get(device.index)
        if pair is None:
            pair = cls._streams[device.index] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return pair

    def _settle(self, compute) -> None:
        pending, self._pending = self._pending, []
        if pending:
            # one side stream copies in order: the last copy's event covers all of them
            compute.wait_event(pending[-1][1].saved)
        for _t, entry in pending:
            # a capture may not wait on an event of the forward graph from the backward graph;
            # from here on the copy is complete in the compute stream's order anyway
            entry.saved = None
        # the blocks go back to the compute stream, which has now waited for their copies
        del pending

    def _pack(self, t: torch.Tensor, kept: bool = False, late: bool = False):
        # `kept`: a tensor a layer keeps for its recomputation on purpose (inside an autograd
        # Function's forward, where it does not require grad yet); `late`: see `pack`
        if not t.is_cuda or not (t.requires_grad or kept) or t.numel() * t.element_size() < self.min_bytes:
            return t
        to_host, _ = self._side_streams(t.device)
        compute = torch.cuda.current_stream(t.device)
        if not kept:  # a layer's input: the copies of the layer before are due by now
            self._settle(compute)
            self._deferred = []  # a new forward: a backward that stopped early left these
        host = _PLAN.buffer_for(t)
        to_host.wait_stream(compute)  # t is complete once the work queued so far is
        with torch.cuda.stream(to_host):
            host.copy_(t, non_blocking=True)
            saved = torch.cuda.Event()
            saved.record(to_host)
        prev = self._last() if self._last is not None else None
        entry = _Offloaded(host, t.device, saved, weakref.ref(prev) if prev is not None else None, late)
        self._last = weakref.ref(entry)
        if torch.cuda.is_current_stream_capturing():
            self._pending.append((t, entry))
        else:
            t.record_stream(to_host)  # its memory is not reused before the copy has read it
        return entry

    def _unpack(self, entry):
        if isinstance(entry, torch.Tensor):
            return entry
        compute = torch.cuda.current_stream(entry.device)
        self._settle(compute)
        if entry.fetched is not None:
            t, entry.fetched = entry.fetched, None
            compute.wait_event(entry.fetch_done)
        else:
            if entry.saved is not None:
                compute.wait_event(entry.saved)
            t = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
            t.copy_(entry.host, non_blocking=True)
        entry.used = True
        if self.prefetch:
            ahead = self._ahead_now(entry)
            if ahead is not None:
                self._fetch_ahead(ahead, compute)
        return t

    def _ahead_now(self, entry: _Offloaded) -> _Offloaded | None:
        """What to fetch ahead now that `entry` was unpacked: the next wanted entry, unless it is
        late, which then waits in `_deferred` (and the one after it is not looked at: one entry
        per unpack keeps the copies in step with backward's pace)."""
        ahead = self._next_wanted(entry)
        if ahead is not None and ahead.late:
            ahead.deferred = True
            self._deferred.append(ahead)
            return None
        return ahead

    def fetch_deferred(self) -> None:
        """Start fetching the late entries held back so far (see `pack`)."""
        deferred, self._deferred = self._deferred, []
        for entry in deferred:
            if not entry.used and entry.fetched is None:
                self._fetch_ahead(entry, torch.cuda.current_stream(entry.device))

    def settle(self) -> None:
        """A layer's first run is over: under capture, let go of its tensors once their copies are
        done (the next layer's input would do the same; after the last layer none comes, and the
        loss would run with them still held)."""
        if self._pending:
            self._settle(torch.cuda.current_stream(self._pending[-1][0].device))

    # what recompute.keep_for_recompute(offload=True) moves with a layer's input
    def pack(self, t: torch.Tensor, late: bool = False):
        """`late`: the tensor is needed well into its layer's recomputation (the kept q/k/v), so
        its copy back waits for `fetch_deferred` -- called once the next layer's MLP backward, the
        peak of a layer's backward, has freed its buffers -- instead of sitting on the GPU
        through it."""
        return self._pack(t, kept=True, late=late)

    def unpack(self, packed) -> torch.Tensor:
        return self._unpack(packed)

    @staticmethod
    def _next_wanted(entry: _Offloaded) -> _Offloaded | None:
        """The latest entry saved before `entry` that backward has neither used nor fetched: the
        next one it will ask for that is not yet on its way (a layer that also offloads a kept
        tensor has two entries, so two can be in flight)."""
        prev = entry.prev() if entry.prev is not None else None
        while prev is not None and (prev.used or prev.fetched is not None or prev.deferred):
            prev = prev.prev() if prev.prev is not None else None
        return prev

    def _fetch_ahead(self, entry: _Offloaded, compute) -> None:
        _, to_device = self._side_streams(entry.device)
        # allocated on the compute stream, which waits for the copy before using it; the side
        # stream first waits for the compute work queued so far, which may still use the block
        t = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
        to_device.wait_stream(compute)
        if entry.saved is not None:
            to_device.wait_event(entry.saved)
        with torch.cuda.stream(to_device):
            t.copy_(entry.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(to_device)
        entry.fetched, entry.fetch_done, entry.fetch_stream = t, done, to_device


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
