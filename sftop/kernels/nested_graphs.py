"""One CUDA-graph memory pool for a model's two graphed stacks whose replays nest: a
vision-language model's tower (its forward replays first and its backward last) and its language
layers (forward and backward in between).

Why: each `StepGraphs` (cuda_graphs.py) keeps one pool, and a pool keeps its captured step's
transients reserved between steps.  With a pool each, a Qwen2.5-VL-3B step kept two such sets,
373 MiB the tower's and 406 MiB the language layers' (NF4, offloaded checkpointing,
docs/benchmarks.md), though the two never live at the same time: the tower's backward runs after
the language layers' has finished, and the tower's forward before theirs starts.  One pool needs
the larger set, plus what the tower's forward keeps for its backward.

Why not simply one pool: a replay writes every block its capture was given, including blocks it
freed, which a later capture may have been given in turn.  The tower's forward keeps its saved
tensors in the pool until its backward; the language layers replay in between, so their capture
must not have been given those blocks.  It is not, if the captures are made in the order the
replays run: the tower's forward (its saved tensors still allocated), then the language layers'
forward and backward, then the tower's backward (`CapturedStep.capture_backward`, deferred to the
first backward that needs it).  Blocks the language capture used and freed may then go to the
tower's backward, which runs after theirs; blocks the tower's forward freed may go to the
language layers, which run after it.

That ordering holds for one capture each: the first training capture of the leader (the tower)
opens a cycle in a fresh pool, a training capture of the follower (the language layers) made
while the cycle is open joins it, and the leader's deferred backward capture closes it.  Every
later training capture goes to its stack's private pool, as without a group: a tower shape
captured later could take blocks the language layers' capture uses, and the language layers
replay between that shape's forward and backward.  Forward-only captures (preference tuning's
reference forward) may use the shared pool: they replay only while no member waits for a
backward (`any_armed`), when no free block holds anything a later replay reads.  What each
member's replay may overwrite of the others' (the static gradients a .grad still points at
during gradient accumulation) is moved out first for every member (`reclaim_all`).

`SFTOP_SHARED_GRAPH_POOL=0` keeps a pool per stack (for comparison)."""

from __future__ import annotations

from typing import Any

from .constants import SHARED_GRAPH_POOL_ENV
from .env import env_flag

UNUSED, OPEN, CLOSED = "unused", "open", "closed"


def sharing_enabled() -> bool:
    return env_flag(SHARED_GRAPH_POOL_ENV, True)


class NestedPools:
    """The shared pool of a leader `StepGraphs` and the follower whose replays nest inside its
    forward and backward; see the module docstring.  Holds only the policy and the pool handle:
    the captures and replays stay each member's."""

    def __init__(self, leader, follower) -> None:
        self.leader: Any = leader
        self.follower: Any = follower
        self.members = (leader, follower)
        self.state = UNUSED
        self.pool = None

    def training_pool(self, graphs) -> tuple[Any, bool]:
        """The pool a training capture of `graphs` goes to, and whether its backward waits (the
        leader's, opening the cycle); (None, False): its private pool."""
        if graphs is self.leader and self.state == UNUSED:
            import torch

            self.pool = torch.cuda.graph_pool_handle()
            self.state = OPEN
            return self.pool, True
        if graphs is self.follower and self.state == OPEN:
            return self.pool, False
        return None, False

    def close(self) -> None:
        """The leader's deferred backward is captured (or its capture failed): later training
        captures go to private pools."""
        if self.state == OPEN:
            self.state = CLOSED

    def forget(self) -> None:
        """A member dropped its captures (after an out-of-memory error): a later cycle starts in
        a fresh pool.  The old one lives on with whatever captures still use it."""
        self.state = UNUSED
        self.pool = None

    def any_armed(self) -> bool:
        """Whether a member's graphed forward waits for its backward (its saved tensors in a pool)."""
        return any(m.armed for m in self.members)

    def reclaim_all(self) -> None:
        """Before any member replays: every member's .grad still over a static gradient gets a copy
        of its own, as each member does for its own before its replays."""
        for m in self.members:
            m.reclaim_own_grads()


def nest(leader, follower) -> NestedPools | None:
    """Share one pool between `leader` and `follower` (StepGraphs), unless switched off or either
    already belongs to a group; the group, or None."""
    if not sharing_enabled() or leader.group is not None or follower.group is not None:
        return None
    group = NestedPools(leader, follower)
    leader.group = follower.group = group
    return group
