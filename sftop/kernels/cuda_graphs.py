"""The model part of a training step (embedding, decoder layers with their checkpoint
recomputation, fused loss; forward and backward) replayed from two CUDA graphs once a micro-batch
shape repeats.

Why: on small models the step is host-bound.  A Llama-3.2-1B LoRA step on an H200 kept the GPU
busy 127 of 165 ms (docs/benchmarks.md, 2026-12-02): the rest is Python launching ~5,000 kernels
(HF's decoder layers, checkpoint recomputation, the autograd Functions' bookkeeping).  Replaying a
captured graph launches them all with one call each way, so the step runs at the GPU's pace.

How:
  * `StepGraphs` (one per patched model) sees a call, keyed by everything that shapes the captured
    work (input shapes, autocast, checkpointing, which tensors the parameters are).  The first
    sighting of a key runs eagerly: variable-length batches (packing) never pay for a capture.
    The second one captures (the first, for keys the caller knows recur: a packed run's length
    buckets fitted to its data): warm-up runs on a side stream (Triton compiles, cuBLAS workspaces,
    the 4-bit scratch buffer reaching its size; two before the model's first capture, one before
    each later one), then the forward (loss *sum*) and
    `torch.autograd.grad` of it w.r.t. the trainable parameters, into one private memory pool.
  * `_Replay` is the autograd Function the caller sees: forward copies the inputs into the
    graph's static buffers and replays; backward copies the incoming gradient and replays, then
    hands autograd the static parameter gradients themselves (new tensors over the same memory).
    Autograd takes a gradient it is given for a parameter whose .grad is None without copying,
    so the step keeps one set of gradients, as an eager step does, not the graph's plus a copy
    (0.16 GiB for an 8B model's LoRA).  The static gradients are one set per model, shared by
    every captured step: the first capture keeps the gradients it makes as that set (in the pool,
    as a single captured step always did), and each later backward graph ends by copying its
    gradients into them (one multi-tensor copy), the gradients it made being pool transients the
    next capture may reuse.  Packed runs capture up to 8 length buckets; a set of their own
    for each kept 7 needless copies (0.29 GiB on a Llama-3.2-1B LoRA, docs/benchmarks.md).  Those
    buffers are rewritten by the next backward replay, so before replaying, any .grad still over
    them (gradient accumulation keeps .grad across micro-batches) is moved into a copy of its
    own, and accumulation adds into that copy.
  * The loss's denominator (tokens that count, or `num_items_in_batch`) is applied outside the
    graph, so it can change every step without a new capture.
  * What is captured need not be a scalar loss: `StepGraphs.replay` takes a function returning a
    tensor or a tuple, differentiates the first (its incoming gradient is copied into a static
    buffer before the backward replay; the loss sum is the case of a scalar with gradient 1) and
    hands the rest out without gradient; with `backward=False` it captures a forward alone
    (preference tuning's reference forward: logprob_graphs.py), into the same pool.

One pool for every capture of a model: forward-only and training captures alike.  A graph's
replay rewrites every block its capture was given, including blocks it freed, which later
captures may have been given in turn; what one replay leaves for later (a training forward's saved
activations for its backward, the static gradients a parameter's .grad still points at) must
therefore not be overwritten by a replay of another graph in between.  The activations: a
forward-only replay while a training forward waits for its backward runs eagerly instead (the
caller puts its no-grad forwards first: DPO's reference forward runs before the policy's,
sftop/engine/train/dpo.py).  The gradients: every replay first moves a .grad still over a static
gradient into a copy of its own.  A pool of its own for the forward-only graphs would keep their
transients reserved beside the training step's for good: measured 1.28 GiB of idle pools for the
two on a Llama-3.2-1B DPO step (docs/benchmarks.md), where one shared pool needs the larger of
the two.

Rules a replay relies on, each enforced here or by the patch part that installs this:
  * one graphed forward, then its backward: a second graphed forward overwrites the first one's
    saved activations, so the first one's backward raises instead of computing garbage;
  * parameters updated in place (optimizers do); a parameter replaced by another tensor changes
    the key, so it is captured afresh;
  * no randomness in the model (dropout 0) and no host synchronisation in the captured code: the
    fused loss runs without its row selection (which needs the count of counted rows on the host);
  * bitsandbytes' 4-bit scratch buffers are frozen once captured: a later, larger request gets a
    new buffer instead of freeing the one a graph writes into;
  * offloaded checkpoints (sftop's overlapped offload, not transformers' blocking one) copy into
    pinned buffers reserved from the last warm-up run, which the captured step owns.

Memory: the pool holds one step's transients (what an eager step allocates and frees); torch's
allocator statistics do not see replays, so `idle_pool_bytes()` reports what the pool keeps
reserved beyond live tensors, for honest peak figures.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
import warnings
from typing import Any
from dataclasses import dataclass, field

import torch

from . import checkpoint_offload as offload
from . import compat
from .constants import CUDA_GRAPHS_ENV, SHARED_GRAPH_POOL_ENV
from .env import env_flag
from .nested_graphs import NestedPools

ENV_SWITCH = CUDA_GRAPHS_ENV
MAX_KEYS = 4  # captured shapes per model; later new shapes run eagerly
WARMUP_RUNS = 2  # before a model's first capture: Triton compiles, cuBLAS workspaces, scratch buffers
# before its later ones (other shapes): the lazy set-up is done; one run compiles what a new shape
# needs and sizes the scratch buffers and offload copies (each warm-up is a whole eager step)
LATER_WARMUP_RUNS = 1
CAPTURE_ON_SIGHTING = 2  # capture when a key is seen for the second time


def enabled_by_env() -> bool:
    return env_flag(ENV_SWITCH, default=True)


# Why the run's plan left no room for the graphs' pool (None: captures follow the room check).
_plan_refusal: str | None = None


def refuse_captures(why: str | None) -> None:
    """Capture nothing in this process from now on (`why`: the plan's reason), or, with None, let
    captures follow `_room_for_capture` again.  The planner sizes a plan without the graphs' pool
    where the pool does not fit its budget; the room check, made at capture time from what the
    allocator holds then, does not know that budget, and once let a capture under a memory cap run
    out of memory on a plan sized eagerly (docs/benchmarks.md, 2026-12-07)."""
    global _plan_refusal
    _plan_refusal = why


def several_processes() -> bool:
    """Training runs in several processes: their collectives run in hooks outside a replayed graph."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


CAPTURE_PHASES = ("warm_up", "clean_up", "forward", "backward")


@dataclass
class GraphStats:
    eager_calls: int = 0
    captures: int = 0
    replays: int = 0
    failures: list[str] = field(default_factory=list)
    # host seconds the captures took, by phase (CAPTURE_PHASES): a capture step costs several eager
    # steps, and a short run's rate depends on how many it makes (docs/benchmarks.md, whole runs)
    capture_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CAPTURE_PHASES, 0.0))

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Adds the wall time of its body to `phase`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.capture_seconds[phase] += time.perf_counter() - start


class StaleGraphBackward(RuntimeError):
    pass


@contextlib.contextmanager
def _aliased(slots):
    """Each trainable parameter replaced, inside its module, by a view of itself made right here.

    The captured backward differentiates w.r.t. these views, not the parameters: an autograd graph
    the caller still holds (a loss kept from an eager step) keeps each parameter's gradient
    accumulator alive on the stream it was made on, and handing a gradient to it from the capture
    stream invalidates the capture.  The views are new nodes on the capture stream, and the
    accumulators are never reached.  Views make no kernels, so this is capture-safe."""
    aliases = []
    for module, name, p in slots:
        a = p.view_as(p)
        module._parameters[name] = a
        aliases.append(a)
    try:
        yield aliases
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


@contextlib.contextmanager
def _no_garbage_collection():
    """Python's cycle collector must not run inside a capture: collecting an unreachable object that
    owns a CUDA graph (an earlier model's captured steps, say) destroys that graph, which is not
    permitted while a stream captures and invalidates the capture (seen on an H200, 2026-12-03)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture.  cuBLAS keeps a 32 MiB workspace
    per stream it has run on, for the life of the process: a fresh warm-up stream per captured
    shape left one more behind each time (seen in benchmarks/memory_peak.py, 2026-12-03)."""
    device = torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class CapturedStep:
    """One key's forward (inputs -> outputs) and, for a training step, its backward (-> parameter
    gradients).

    `fn` returns one tensor or a tuple of tensors.  The first is the one differentiated: the loss
    sum (a scalar, whose incoming gradient is 1) or a vector such as per-token log-probabilities,
    whose incoming gradient the replay copies into `grad_out`; the others are metrics without
    gradient.  `backward=False` captures a forward only (run under no_grad, e.g. DPO's reference
    forward): no gradients, no offloaded checkpoints.  `grad_inputs`: positions of inputs whose
    gradients the backward also makes (into static buffers of the pool), for the caller to pass on."""

    grad_inputs: tuple[int, ...] = ()
    input_grads: list[torch.Tensor | None] = []
    _pending: tuple | None = None  # what a backward capture still to be made needs

    def __init__(
        self,
        fn,
        inputs: tuple[torch.Tensor, ...],
        slots: list,
        pool,
        no_rng_stash,
        backward: bool = True,
        warm_up_in_pool: bool = False,
        grad_buffers: list[torch.Tensor | None] | None = None,
        grad_inputs: tuple[int, ...] = (),
        warm_up_runs: int = WARMUP_RUNS,
        defer_backward: bool = False,
        stats: GraphStats | None = None,
    ):
        self.stats = stats or GraphStats()
        self.n_inputs = len(inputs)
        self.slots, self.pool = slots, pool
        self.backward = backward
        self.grad_inputs = grad_inputs if backward else ()
        self.static_inputs = [t.detach().clone() for t in inputs]
        for i in self.grad_inputs:  # leaves of the captured work: their gradients come out of backward
            self.static_inputs[i].requires_grad_()
        params = [p for _m, _n, p in slots]
        wrt_inputs = [self.static_inputs[i] for i in self.grad_inputs]
        torch.cuda.synchronize()
        side = _capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        moved = None
        warm_pool = pool if warm_up_in_pool and not backward else None
        before_warm_up = torch.cuda.memory_allocated()
        with self.stats.timed("warm_up"):
            with no_rng_stash(), causal_masks_skipped(), torch.cuda.stream(side), _allocating_into(warm_pool):
                for run in range(warm_up_runs):
                    last = run == warm_up_runs - 1 and backward
                    with offload.recording_offloads() if last else contextlib.nullcontext() as moved:
                        outs = _as_tuple(fn(*self.static_inputs))
                    if backward:
                        torch.autograd.grad(
                            outs[0], params + wrt_inputs, grad_outputs=torch.ones_like(outs[0]), allow_unused=True
                        )
                    del outs
            torch.cuda.current_stream().wait_stream(side)
            # offloaded checkpoints (checkpoint_offload.py): the replays copy into these pinned buffers
            self.host_buffers = offload.reserve_host_buffers(moved) if backward else []
            torch.cuda.synchronize()
        with self.stats.timed("clean_up"):
            # the warm-up's blocks sit in the ordinary cache; the pool can't use them
            short = cache_release_needed()
            collect_warm_up_garbage(before_warm_up, full=short)
            if short:
                torch.cuda.empty_cache()
        self.fwd = torch.cuda.CUDAGraph()
        self.bwd: torch.cuda.CUDAGraph | None = None
        self.input_grads = []
        self.grads: list[torch.Tensor | None] = []
        self.grad_ptrs: set[int] = set()
        with self.stats.timed("forward"), no_rng_stash(), causal_masks_skipped(), _no_garbage_collection():
            with torch.cuda.graph(self.fwd, pool=pool, stream=side), _aliased(slots) as aliases:
                with offload.offloading_into(self.host_buffers) if backward else contextlib.nullcontext():
                    outs = _as_tuple(fn(*self.static_inputs))
                if backward:
                    offload.settle_pending()  # the copies to host joined before the capture ends
            # allocated between the captures: an ordinary static buffer that backward copies into
            self.grad_out = torch.ones_like(outs[0])
        self.outputs = [o.detach() for o in outs]
        self.loss = self.outputs[0]
        # what the backward capture needs; `outs[0]`'s autograd graph holds the forward's saved
        # tensors (pool blocks) allocated until then
        self._pending = (outs[0], aliases, wrt_inputs, pool, side, no_rng_stash, grad_buffers) if backward else None
        del outs
        if backward and not defer_backward:
            self.capture_backward()

    @property
    def backward_pending(self) -> bool:
        """A training step whose backward is not captured yet (nested_graphs.py defers it)."""
        return self._pending is not None

    def capture_backward(self) -> None:
        """Capture the backward of the captured forward: right after it, or (deferred) at the first
        backward that needs it, once the captures that replay in between are made."""
        assert self._pending is not None, "captured already, or a forward-only step"
        out, aliases, wrt_inputs, pool, side, no_rng_stash, grad_buffers = self._pending
        self._pending = None
        self.bwd = torch.cuda.CUDAGraph()
        with self.stats.timed("backward"), no_rng_stash(), causal_masks_skipped(), _no_garbage_collection():
            with torch.cuda.graph(self.bwd, pool=pool, stream=side):
                made = torch.autograd.grad(out, [*aliases, *wrt_inputs], grad_outputs=self.grad_out, allow_unused=True)
                grads = _into_shared(made[: len(aliases)], grad_buffers)
                # static buffers of this graph, rewritten by its next backward replay
                self.input_grads = list(made[len(aliases) :])
                del made  # freed inside the capture: pool blocks the next capture may take
        self.grads = list(grads)
        self.grad_ptrs = {g.data_ptr() for g in self.grads if g is not None}

    def load(self, inputs) -> None:
        # through `.data`, which leaves the buffers' version counters alone: a deferred backward
        # capture (nested_graphs.py) differentiates the capture's own forward graph after the first
        # replay has loaded its inputs, and autograd would take that load for an in-place change of
        # a tensor the forward saved.  It is none: the replays read the buffers afresh every time.
        for dst, src in zip(self.static_inputs, inputs):
            dst.data.copy_(src)

    def handed_out_input_grads(self) -> list[torch.Tensor | None]:
        """One gradient per input (None where the capture took none): copies, which autograd passes
        on into the eager work before this step, while the static buffers belong to the next replay."""
        out: list[torch.Tensor | None] = [None] * self.n_inputs
        for i, g in zip(self.grad_inputs, self.input_grads):
            out[i] = None if g is None else g.clone()
        return out

    def handed_out_grads(self) -> list[torch.Tensor | None]:
        # new tensor objects over the static buffers: autograd keeps them as .grad without a copy
        return [None if g is None else g.detach() for g in self.grads]

    def taken_outputs(self) -> tuple[torch.Tensor, ...]:
        # copies: the next replay of any graph in the pool may rewrite the static outputs
        return tuple(o.clone() for o in self.outputs)


def collect_warm_up_garbage(before: int, allocated=None, collect=gc.collect, full: bool = True) -> bool:
    """Free what the warm-up runs left in reference cycles, so that the cache can give their
    blocks back before the capture takes its own; True where a full collection ran.

    Why not always a full collection: it walks every Python object of the process (half a million
    in a training process, 0.24 s on a CPU measured with the demo model loaded; 0.39 s of a 7.0 s
    1B whole run on an H100, docs/benchmarks.md, 2026-12-07).  The young generations hold what the
    warm-ups just made; only where GPU memory is still allocated beyond what it was before them
    (`before`, bytes) and `full` (the capture is short of room: `cache_release_needed`) does the
    full collection run.  A first capture always leaves some allocated (the side stream's cuBLAS
    workspace, scratch buffers), so with room to spare the search would cost its time for nothing
    the capture needs; Python's own collections free any cycles later."""
    allocated = allocated or torch.cuda.memory_allocated
    collect(1)
    if not full or allocated() <= before:
        return False
    collect()
    return True


def _into_shared(made: tuple, buffers: list[torch.Tensor | None] | None) -> tuple:
    """The gradients a captured backward made, copied into the model's shared gradient buffers
    (`buffers`, one per parameter); where a parameter has none yet (None, or no list at all) the
    gradient made is kept as its buffer.  A parameter without a gradient keeps None."""
    if buffers is None:
        return made
    pairs = [(b, g) for b, g in zip(buffers, made) if g is not None and b is not None]
    if pairs:
        torch._foreach_copy_([b for b, _g in pairs], [g for _b, g in pairs])
    return tuple(None if g is None else (g if b is None else b) for b, g in zip(buffers, made))


@contextlib.contextmanager
def _allocating_into(pool):
    """This thread's allocations taken from the graphs' pool `pool` (None: the ordinary cache).

    A forward-only capture made after a training step's (DPO's reference forward) warms up here:
    its warm-up transients then reuse the blocks the training step left free instead of sitting in
    the ordinary cache beside the whole pool, which for that moment held both steps' transients
    (the Llama-3.2-1B DPO step's reference forward: about 0.3 GiB).  Safe for the same reason the
    forward-only replay is: no graphed forward waits for its backward (StepGraphs.replay checks),
    so no block free in the pool holds anything a later replay reads, and static gradients are
    allocated blocks.  A forward-only warm-up allocates on this thread only (no backward, whose
    engine threads would not be routed).  The private hooks are those torch's own CUDA-graph trees
    warm up with; where they are missing the warm-up uses the ordinary cache as before."""
    hooks = [getattr(torch._C, name, None) for name in _POOL_HOOKS]
    if pool is None or any(h is None for h in hooks):
        yield
        return
    begin, end, release = hooks
    device = torch.cuda.current_device()
    begin(device, pool)
    try:
        yield
    finally:
        end(device, pool)
        release(device, pool)  # begin took a reference to the pool


_POOL_HOOKS = ("_cuda_beginAllocateCurrentThreadToPool", "_cuda_endAllocateToPool", "_cuda_releasePool")


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs, step, *tensors):
        graphs.reclaim_before_replay(tensors[step.n_inputs :])
        step.load(tensors[: step.n_inputs])
        step.fwd.replay()
        ctx.graphs, ctx.step = graphs, step
        ctx.generation = graphs.arm(step)
        outs = step.taken_outputs()
        if len(outs) == 1:
            return outs[0]
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad, *_metric_grads):
        graphs, step = ctx.graphs, ctx.step
        graphs.take_armed(step, ctx.generation)
        if step.backward_pending:
            graphs.capture_deferred_backward(step)
        step.grad_out.copy_(grad)
        step.bwd.replay()
        return (None, None) + tuple(step.handed_out_input_grads()) + tuple(step.handed_out_grads())


class StepGraphs:
    """Captured steps of one model, keyed; see the module docstring."""

    def __init__(self, no_rng_stash=None, max_keys: int = MAX_KEYS, recurring=None):
        self._no_rng_stash = no_rng_stash or contextlib.nullcontext
        self.max_keys = max_keys
        # keys the caller knows will recur (a packed run's length buckets, fitted to its data):
        # their training steps are captured at the first sighting, without an eager run before the
        # capture's own warm-up, which does the same work (packed_graphs.py)
        self._recurring = recurring or (lambda key: False)
        self._generation = 0
        self.stats = GraphStats()
        self.one = None  # a device 1.0 for the loss's denominator inside graphs (no host tensor in a capture)
        # a pool shared with another StepGraphs whose replays nest with these (nested_graphs.py)
        self.group: NestedPools | None = None
        self._forget()

    def _forget(self) -> None:
        """The state of a model nothing was captured for (what `release` goes back to)."""
        self._pool = None  # every capture's, forward-only ones too (see the module docstring)
        # in a group: the training captures outside its shared cycle (`_pool` is then the first pool
        # used, where forward-only captures go)
        self._private_pool = None
        self._trained: dict[int, torch.Tensor] = {}  # the parameters whose gradients captured steps hand out
        self._seen: dict = {}
        self._steps: dict = {}
        self._refused: dict = {}
        self._grad_ptrs: set[int] = set()  # the static gradients captured steps hand out
        self._grad_buffers: dict[int, torch.Tensor] = {}  # id(parameter) -> its shared static gradient
        self._armed: tuple[Any, int] | None = None
        self.layout = None  # the model's parameters listed once for the keys (graph_layout.ModelLayout)
        self._refuse_all: str | None = None  # set when a capture ran out of memory: eager from then on

    def release(self) -> None:
        """Drop every captured step and the pool they share, as if nothing had been captured: after
        an out-of-memory error, the smaller plan that follows needs that memory (it captures its own
        shapes again if there is room)."""
        self._forget()
        if self.group is not None:
            self.group.forget()

    def unit(self, device) -> torch.Tensor:
        if self.one is None or self.one.device != device:
            self.one = torch.ones((), dtype=torch.float32, device=device)
        return self.one

    # -- replay bookkeeping
    @property
    def armed(self) -> bool:
        """A graphed training forward waits for its backward."""
        return self._armed is not None

    def arm(self, step) -> int:
        self._generation += 1
        self._armed = (step, self._generation)
        return self._generation

    def take_armed(self, step, generation: int) -> None:
        if self._armed is None or self._armed[0] is not step or self._armed[1] != generation:
            raise StaleGraphBackward(
                "sftop CUDA graphs: this backward belongs to a graphed forward whose saved activations a "
                "later forward has overwritten (two training forwards before one backward, or backward run "
                f"twice). Run backward after each forward, or set {ENV_SWITCH}=0 to train without graphs."
            )
        self._armed = None

    # -- the entry points
    def holds(self, key) -> bool:
        """Whether `key` has a captured step (its next call replays)."""
        return key in self._steps

    def would_capture(self, key) -> bool:
        """Whether a call with `key` captures it now (it is seen often enough, not refused, and
        there is room): the one kind of call whose parameter list must be made afresh
        (graph_layout.py).  For a forward-only step that `replay` makes wait one sighting more it
        answers True a sighting early: one listing too many, never one too few."""
        return (
            key not in self._steps
            and key not in self._refused
            and len(self._steps) < self.max_keys
            and self._seen.get(key, 0) + 1 >= (1 if self._recurring(key) else CAPTURE_ON_SIGHTING)
        )

    def loss_sum(self, key, fn, inputs: tuple[torch.Tensor, ...], slots: list):
        """The sum of token losses from the graphs, or None when this call should run eagerly.
        `slots` are (module, name, parameter) of every trainable parameter `fn` uses."""
        return self.replay(key, fn, inputs, slots)

    def replay(
        self,
        key,
        fn,
        inputs: tuple[torch.Tensor, ...],
        slots: list,
        backward: bool = True,
        grad_inputs: tuple[int, ...] = (),
    ):
        """`fn(*inputs)` from the graphs (a tensor, or a tuple whose first member carries the gradient
        and the rest are metrics), or None when this call should run eagerly.  `backward=False`: a
        forward under no_grad, captured without a backward into the shared pool; it runs eagerly
        while a graphed training forward waits for its backward, whose saved activations its
        transients could overwrite.  `grad_inputs`: the positions of inputs whose gradient the
        backward hands on (activations from eager work before the step, such as embeddings an
        image tower wrote into); the key must tell such calls apart from others."""
        if not backward and (self.group.any_armed() if self.group is not None else self.armed):
            self.stats.eager_calls += 1
            return None
        step = self._steps.get(key)
        if step is None:
            if key in self._refused or len(self._steps) >= self.max_keys:
                self.stats.eager_calls += 1
                return None
            seen = self._seen.get(key, 0) + 1
            self._seen[key] = seen
            # a forward-only step waits one sighting more unless a training step is captured
            # already: captured after it, it lands in the blocks the training step freed (its
            # transients mirror the training forward's, with less kept), where captured first its
            # free blocks get split by the training capture's smaller requests and the training
            # step's largest transient (the logits' chunk) needs a segment of its own
            if backward and self._recurring(key):
                wait = 1
            else:
                wait = CAPTURE_ON_SIGHTING + (0 if backward or self._trained else 1)
            if seen < wait:
                self.stats.eager_calls += 1
                return None
            why = (
                self._refuse_all
                or _plan_refusal
                or _room_for_capture(self._new_gradient_bytes(slots) if backward else 0)
            )
            if why is None:
                step, why = self._capture(fn, inputs, slots, backward, grad_inputs)
            if step is None:
                self._refused[key] = why
                self.stats.failures.append(why)
                self.stats.eager_calls += 1
                return None
            self._steps[key] = step
            if backward and not step.backward_pending:
                self._keep_gradients(step, slots)
            self._seen.pop(key, None)
        if step.backward != backward or (backward and step.grad_inputs != tuple(grad_inputs)):
            # a key must tell the kinds apart; never guess
            raise ValueError(
                f"sftop CUDA graphs: key {key!r} was captured with backward={step.backward}, "
                f"grad_inputs={step.grad_inputs}"
            )
        self.stats.replays += 1
        if not backward:
            self.reclaim_before_replay(self._trained.values())
            step.load(inputs)
            step.fwd.replay()
            outs = step.taken_outputs()
            return outs[0] if len(outs) == 1 else outs
        return _Replay.apply(self, step, *inputs, *(p for _m, _n, p in slots))

    def _keep_gradients(self, step, slots) -> None:
        """A training step's backward is captured: its gradients are what replays hand out."""
        self._grad_ptrs |= step.grad_ptrs
        self._trained.update((id(p), p) for _m, _n, p in slots)
        # the gradients this capture kept become the shared ones of parameters that had none
        for (_m, _n, p), g in zip(slots, step.grads):
            if g is not None:
                self._grad_buffers[id(p)] = g

    def capture_deferred_backward(self, step) -> None:
        """The backward of a step whose capture waited for the group's other captures
        (nested_graphs.py), captured at its first backward; the group's cycle closes either way."""
        try:
            step.capture_backward()
        except torch.cuda.OutOfMemoryError:
            raise  # the trainer's recovery takes it: a smaller plan, the graphs released
        except Exception as exc:
            raise RuntimeError(
                f"sftop CUDA graphs: capturing a deferred backward failed ({type(exc).__name__}: {exc}). "
                f"Set {SHARED_GRAPH_POOL_ENV}=0 to capture it with its forward, or {ENV_SWITCH}=0 to train "
                "without graphs."
            ) from exc
        finally:
            if self.group is not None:
                self.group.close()
        self._keep_gradients(step, step.slots)

    def _pool_for(self, backward: bool):
        """The pool a capture goes to, and whether its backward capture waits (nested_graphs.py)."""
        if backward and self.group is not None:
            shared, defer = self.group.training_pool(self)
            if shared is not None:
                if self._pool is None:
                    self._pool = shared
                return shared, defer
            if self._private_pool is None:
                self._private_pool = torch.cuda.graph_pool_handle()
            if self._pool is None:
                self._pool = self._private_pool
            return self._private_pool, False
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool, False

    def _capture(self, fn, inputs, slots, backward=True, grad_inputs=()):
        from . import scratch

        pool, defer = self._pool_for(backward)
        # a graph bakes in the scratch buffers' addresses: they must never be freed from now on
        scratch.freeze_all()
        try:
            step = CapturedStep(
                fn,
                inputs,
                slots,
                pool,
                self._no_rng_stash,
                backward=backward,
                warm_up_in_pool=bool(self._trained),
                grad_buffers=self._shared_grads(slots) if backward else None,
                grad_inputs=tuple(grad_inputs),
                warm_up_runs=WARMUP_RUNS if self.stats.captures == 0 else LATER_WARMUP_RUNS,
                defer_backward=defer,
                stats=self.stats,
            )
        except Exception as exc:  # noqa: BLE001 - an uncapturable model keeps training eagerly
            if defer and self.group is not None:
                self.group.close()
            offload.discard_pending()
            torch.cuda.synchronize()
            why = f"capture failed ({type(exc).__name__}: {str(exc)[:300]})"
            # what the failed attempt allocated (its warm-up's cache, the unfinished graph's pool
            # blocks) goes back, so the eager steps that follow have the memory the plan gave them
            gc.collect()
            torch.cuda.empty_cache()
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                # another shape would only fail the same way, each time at the cost of a capture
                self._refuse_all = f"no more captures: an earlier one ran out of memory ({why})"
            warnings.warn(f"sftop: CUDA graphs off for this batch shape: {why}", stacklevel=3)
            return None, why
        self.stats.captures += 1
        return step, None

    def _shared_grads(self, slots) -> list[torch.Tensor | None]:
        """Each trainable parameter's static gradient, shared by every captured step (see the module
        docstring); None where it has none yet, and the capture's own gradient becomes it."""
        out: list[torch.Tensor | None] = []
        for _m, _n, p in slots:
            buf = self._grad_buffers.get(id(p))
            fits = buf is not None and buf.shape == p.shape and buf.dtype == p.dtype and buf.device == p.device
            out.append(buf if fits else None)
        return out

    def _new_gradient_bytes(self, slots) -> int:
        """What a training capture adds for good: the shared gradients its parameters lack so far."""
        shared = self._shared_grads(slots)
        return _gradient_bytes([slot for slot, buf in zip(slots, shared) if buf is None])

    def reclaim_before_replay(self, params) -> None:
        """`reclaim_grads` of `params`, or in a group of every member's trained parameters: a
        member's replay may rewrite the others' static gradients (nested_graphs.py)."""
        if self.group is not None:
            self.group.reclaim_all()
        else:
            self.reclaim_grads(params)

    def reclaim_own_grads(self) -> None:
        self.reclaim_grads(self._trained.values())

    def reclaim_grads(self, params) -> None:
        """Before any replay: a parameter's .grad that is still a captured step's static gradient
        (gradient accumulation keeps .grad across micro-batches) gets a copy of its own.  All
        captured steps share one set of static gradients, which any backward replay rewrites."""
        if not self._grad_ptrs:
            return
        for p in params:
            g = p.grad
            if g is not None and g.data_ptr() in self._grad_ptrs:
                p.grad = g.clone()


def _gradient_bytes(slots) -> int:
    """The static gradient buffers a training capture keeps for its trainable parameters."""
    return sum(p.numel() * p.element_size() for _m, _n, p in slots if p.requires_grad)


def capturable(t: torch.Tensor) -> bool:
    """Whether a batch tensor lives where a captured step can take it (a CUDA device).  One place,
    so that the CPU tests can run what surrounds a capture."""
    return t.is_cuda


def token_ids_only(kwargs: dict, ids: torch.Tensor, false_flags: tuple[str, ...] = ()) -> bool:
    """Whether a model call carries nothing a captured step does not take: the token ids, a padding
    mask of their shape, `use_cache` off, unset (None) arguments, and the `false_flags` set to False."""
    for k, v in kwargs.items():
        if v is None or k == "input_ids" or (k == "use_cache" and not v):
            continue
        if k == "attention_mask" and torch.is_tensor(v) and v.shape == ids.shape:
            continue
        if k in false_flags and v is False:
            continue
        return False
    return True


def _capture_room(static_bytes: int = 0) -> tuple[int, int, int]:
    """(free, cached, needed) bytes for a capture: the device's free memory (under a memory cap, what
    is left under it), the ordinary cache's unused blocks, and what `_room_for_capture` asks for."""
    free, total = torch.cuda.mem_get_info()
    # Under a memory cap (plan.max_memory_gib: torch.cuda.set_per_process_memory_fraction) what
    # counts is the room left under it, however much the GPU itself has free.
    fraction = (
        torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    )
    if fraction < 1.0:
        free = max(0, min(free, int(fraction * total) - torch.cuda.memory_reserved()))
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    need = 2 * (torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()) + static_bytes
    return free, cached, need


def cache_release_needed() -> bool:
    """Whether a capture needs the ordinary cache's unused blocks given back first: only where the
    device's free memory (under a cap, the room left under it) does not hold what a capture asks
    for.  While a stream captures, the allocator cannot free cached blocks to make room, so under
    a tight plan they must go before; elsewhere giving them back only makes the eager steps after
    the capture allocate them again.  (With room to spare neither this nor the full garbage
    collection runs: a capture's clean-up took 1 ms in a 1B whole run on an H100, where the
    collection alone had taken 0.39 s, docs/benchmarks.md, 2026-12-07.)"""
    free, _cached, need = _capture_room()
    return free < need


def _room_for_capture(static_bytes: int = 0) -> str | None:
    """Refuse to capture unless the largest step transient seen so far fits twice beside what is
    live: once in the graphs' pool (which keeps it for good) and once in the ordinary cache, which
    eager steps of other shapes still need and which the pool cannot borrow from; plus
    `static_bytes`, what the captured step keeps allocated for good (the shared gradient buffers,
    at the first training capture).  A plan sized tightly to the GPU therefore trains
    eagerly rather than risk running out of memory."""
    free, cached, need = _capture_room(static_bytes)
    if free + cached < need:
        return (
            f"not enough free GPU memory to capture ({(free + cached) / 2**30:.2f} GiB free, {need / 2**30:.2f} needed)"
        )
    return None


@contextlib.contextmanager
def causal_masks_skipped():
    """While capturing, let transformers leave out the causal mask of an unpadded batch, as it does
    eagerly.  Its SDPA mask function refuses that shortcut while a CUDA stream captures (a graph
    traced for export must not bake in `is_causal`), and then hands SDPA a [B, 1, T, T] mask,
    which costs flash attention: measured 1.3x the GPU time of the eager step (1B, H200).
    Only batches without padding or packing are ever captured or replayed (the patch part checks
    each call, and passes an all-ones padding mask so that transformers does not try to detect
    packing from position ids, which needs a host sync), so within the capture a plain causal
    request can skip its mask; anything else (sliding windows, custom mask functions, caches)
    gets transformers' own mask.  Scoped to the capture through the registry's instance-level
    override, which is removed afterwards."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks

    previous = masks["sdpa"]

    def sdpa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
        plain_causal = (
            kwargs.get("allow_is_causal_skip", False)
            and kwargs.get("local_size") is None
            and q_length == kv_length
            and isinstance(q_offset, int)
            and q_offset == 0
            and isinstance(kv_offset, int)
            and kv_offset == 0
        )
        if plain_causal:
            return None
        return previous(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )

    masks["sdpa"] = sdpa_mask
    try:
        yield
    finally:
        del masks["sdpa"]
        if masks["sdpa"] is not previous:  # someone's own instance-level override was there before
            masks["sdpa"] = previous


def no_rng_stash(model: torch.nn.Module):
    """A context factory: while it is active the model's checkpointed layers run non-reentrant
    checkpointing without stashing the RNG state (reading it inside a capture is not allowed, and a
    model without dropout draws no random numbers)."""

    @contextlib.contextmanager
    def ctx():
        swapped = []
        for m in model.modules():
            fn = compat.checkpoint_function(m, own=True)
            if fn is not None:
                swapped.append((m, fn))
                compat.set_checkpoint_function(m, functools.partial(fn, preserve_rng_state=False))
        try:
            yield
        finally:
            for m, fn in swapped:
                compat.set_checkpoint_function(m, fn)

    return ctx


def idle_pool_bytes() -> int:
    """Bytes that CUDA-graph pools keep reserved without a live tensor in them: the transients a
    replayed step uses, which torch's allocated-memory statistics never see."""
    idle = 0
    for seg in torch.cuda.memory_snapshot():
        if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            idle += seg["total_size"] - seg["allocated_size"]
    return idle
