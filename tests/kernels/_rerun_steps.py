"""Captured CUDA-graph steps stood in for on the CPU (imported by name: tests/ is not a package).

`RerunStep` is what `StepGraphs._capture` returns in these tests: each "replay" runs the captured
function afresh on the static inputs (forward with autograd, backward by autograd.grad into the
static gradients), so everything around a capture (keys, sightings, the static buffers' copies,
the gradients handed out, the order rules) runs as on a GPU; only the graph itself is not there.
"""

from __future__ import annotations

import itertools
import types

import torch

from sftop.kernels import cuda_graphs as cg


class RerunStep(cg.CapturedStep):
    def __init__(self, fn, inputs, slots, backward, grad_inputs=(), pool=None, defer_backward=False):
        self.fn, self.n_inputs, self.backward = fn, len(inputs), backward
        self.slots, self.pool = slots, pool
        self.grad_inputs = tuple(grad_inputs)
        self.static_inputs = [t.detach().clone() for t in inputs]
        for i in self.grad_inputs:
            self.static_inputs[i].requires_grad_()
        self.params = [p for _m, _n, p in slots]
        # a backward whose capture waits (nested_graphs.py): as on a GPU, the capture's own forward
        # keeps its autograd graph until then, and the backward capture differentiates that graph,
        # so anything written in place into what it saved in between fails here as it would there
        self._pending = None
        if backward and defer_backward:
            with torch.enable_grad():
                out = fn(*self.static_inputs)
            self._pending = out[0] if isinstance(out, (tuple, list)) else out
        self.outputs, self.grads, self.grad_ptrs, self.grad_out = [], [], set(), None
        self.input_grads = []
        self.fwd = types.SimpleNamespace(replay=self._forward)
        self.bwd = types.SimpleNamespace(replay=self._backward) if backward else None

    def capture_backward(self):
        assert self._pending is not None
        out, self._pending = self._pending, None
        wrt = self.params + [self.static_inputs[i] for i in self.grad_inputs]
        torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)

    def _forward(self):
        with torch.enable_grad() if self.backward else torch.no_grad():
            outs = self.fn(*self.static_inputs)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        self._out = outs[0]  # the one differentiated; the rest are metrics
        self.outputs = [o.detach() for o in outs]
        self.grad_out = torch.zeros_like(self._out)

    def _backward(self):
        wrt = self.params + [self.static_inputs[i] for i in self.grad_inputs]
        made = torch.autograd.grad(self._out, wrt, self.grad_out, allow_unused=True)
        self.grads, self.input_grads = list(made[: len(self.params)]), list(made[len(self.params) :])


def rerun_captures(monkeypatch) -> list:
    """Make captures `RerunStep`s on the CPU; the (input shapes, trainable count, backward) of each.
    Each step's `pool` is the pool handle it would be captured into (handles counted from 1)."""
    made = []

    def capture(self, fn, inputs, slots, backward=True, grad_inputs=()):
        pool, defer = self._pool_for(backward)
        made.append(([tuple(t.shape) for t in inputs], len(slots), backward))
        self.stats.captures += 1
        return RerunStep(fn, inputs, slots, backward, grad_inputs, pool, defer), None

    handles = itertools.count(1)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (next(handles), 0))
    monkeypatch.setattr(cg, "capturable", lambda t: True)
    monkeypatch.setattr(cg, "_room_for_capture", lambda static_bytes=0: None)
    monkeypatch.setattr(cg.StepGraphs, "_capture", capture)
    return made
