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
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

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


def checkpoint_marking_recompute(function, *args, _checkpoint=checkpoint, **kwargs):
    """`_checkpoint(function, *args, **kwargs)` whose recomputations run under `recomputing()`."""
    calls = 0

    def run(*a, **k):
        nonlocal calls
        calls += 1
        if calls == 1:
            return function(*a, **k)
        with marked_as_recompute():
            return function(*a, **k)

    return _checkpoint(run, *args, **kwargs)
