"""One memory pool for a VLM's tower and language graphs (sftop/kernels/nested_graphs.py): which
pool each capture goes to, when the cycle opens and closes, and the group-wide rules a shared pool
needs (no forward-only replay while any member waits for its backward; every member's gradients
moved off the static buffers before any member replays).  The GPU side is in test_vision_graphs.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from sftop.kernels import cuda_graphs as cg
from sftop.kernels import nested_graphs as NG


@pytest.fixture(autouse=True)
def sharing_on(monkeypatch):
    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "1")


@pytest.fixture
def handles(monkeypatch):
    counter = itertools.count(1)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (next(counter), 0))


def _pair():
    tower, language = cg.StepGraphs(), cg.StepGraphs()
    group = NG.nest(tower, language)
    assert group is not None
    return tower, language, group


def test_only_the_first_cycle_shares_a_pool(handles):
    tower, language, group = _pair()
    # the language layers before any cycle: their private pool
    assert language._pool_for(backward=True) == ((1, 0), False)
    # the tower's first training capture opens the cycle, its backward deferred
    assert tower._pool_for(backward=True) == ((2, 0), True) and group.state == NG.OPEN
    # the language layers' capture inside the open cycle joins it; a second one too (both avoid
    # the tower's saved tensors, allocated until its backward is captured)
    assert language._pool_for(backward=True) == ((2, 0), False)
    assert language._pool_for(backward=True) == ((2, 0), False)
    group.close()
    # later training captures: private pools (a tower shape captured now could take blocks the
    # language layers' replays write between its forward and backward)
    assert tower._pool_for(backward=True) == ((3, 0), False)
    assert language._pool_for(backward=True) == ((1, 0), False)
    # forward-only captures: the first pool each used
    assert tower._pool_for(backward=False) == ((2, 0), False)
    assert language._pool_for(backward=False) == ((1, 0), False)


def test_a_released_member_starts_a_fresh_cycle(handles):
    tower, language, group = _pair()
    assert tower._pool_for(backward=True) == ((1, 0), True)
    group.close()
    tower.release()  # an out-of-memory step-down drops the captures
    assert group.state == NG.UNUSED and group.pool is None
    assert tower._pool_for(backward=True) == ((2, 0), True)
    assert language._pool_for(backward=True) == ((2, 0), False)


def test_switched_off_or_already_grouped_no_group(monkeypatch):
    tower, language, _group = _pair()
    assert NG.nest(tower, cg.StepGraphs()) is None  # a member belongs to one group
    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "0")
    assert NG.nest(cg.StepGraphs(), cg.StepGraphs()) is None
    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "maybe")
    with pytest.raises(ValueError, match="SFTOP_SHARED_GRAPH_POOL"):
        NG.nest(cg.StepGraphs(), cg.StepGraphs())


def test_a_forward_only_replay_waits_while_any_member_is_armed(monkeypatch):
    """The tower's forward waits for its backward: the language layers' forward-only call runs
    eagerly, as it would for their own armed step (its replay could overwrite the tower's saved
    tensors in the shared pool)."""
    monkeypatch.setattr(cg, "_room_for_capture", lambda static_bytes=0: None)
    tower, language, group = _pair()
    language._steps["reference"] = step = object.__new__(cg.CapturedStep)
    step.backward = False
    tower.arm(object())
    assert group.any_armed()
    with torch.no_grad():
        assert language.replay("reference", None, (torch.ones(2),), [], backward=False) is None
    assert language.stats.eager_calls == 1 and language.stats.replays == 0


def test_every_members_gradients_leave_the_static_buffers_before_a_replay():
    tower, language, _group = _pair()
    w_tower, w_language = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    static_tower, static_language = torch.zeros(3), torch.zeros(3)
    for graphs, w, static in ((tower, w_tower, static_tower), (language, w_language, static_language)):
        graphs._trained[id(w)] = w
        graphs._grad_ptrs.add(static.data_ptr())
        w.grad = static.detach()
    language.reclaim_before_replay([w_language])  # the language layers replay next
    # the tower's .grad moved too: the language layers' replay may write where its static gradient is
    assert w_tower.grad.data_ptr() != static_tower.data_ptr()
    assert w_language.grad.data_ptr() != static_language.data_ptr()
    assert torch.equal(w_tower.grad, static_tower)


def test_a_failed_deferred_backward_capture_closes_the_cycle_and_says_what_to_do():
    tower, _language, group = _pair()
    group.state = NG.OPEN

    class Broken:
        slots: list = []

        def capture_backward(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="SFTOP_SHARED_GRAPH_POOL=0"):
        tower.capture_deferred_backward(Broken())
    assert group.state == NG.CLOSED
