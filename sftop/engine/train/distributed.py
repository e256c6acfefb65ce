"""What a rank of a multi-process run does differently: agree with the others, and write its own files.

Every rank must take the same decisions at the same step (stop, save), or the next collective
waits forever for a rank that left: `agree_any` all-reduces a flag so that one rank's stop
request stops them all at the same step. Outside a multi-process run every helper is a no-op.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from sftop.engine.gpu_select import rank_info


def world_size() -> int:
    return rank_info()[2]


def is_main() -> bool:
    return rank_info()[0] == 0


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_any(flag: bool) -> bool:
    """True on every rank when it is true on any (one all-reduce); the flag itself outside a group."""
    if not _group_ready():
        return flag
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def agreed_stop(local: str | None) -> str | None:
    """This rank's stop request, or "SIGTERM" when another rank has one: the same answer on every rank.

    Every rank joins the all-reduce whether or not it has a request of its own. A rank that skipped
    it because it already knew to stop would leave the others waiting in that collective while it
    saves a checkpoint: the run would hang until the process group's timeout.
    """
    anyone = agree_any(local is not None)
    return local or ("SIGTERM" if anyone else None)


def ranks_max(values: Sequence[int]) -> list[int]:
    """Each value's largest over all ranks (one all-reduce); the values themselves outside a group."""
    if not _group_ready():
        return [int(v) for v in values]
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


class RanksMemory:
    """A startup probe's allocator counters as the fullest rank saw them.

    Every rank of a data-parallel run probes the same synthetic batch on its own GPU, but GPUs may
    differ (another process on one, a card with less memory). Judging each rank by the largest
    peak of all gives every rank the same verdict and the same next plan, so the ranks never
    disagree on the micro-batch they train with. `inner` reads this rank's device.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.oom_error = inner.oom_error

    def reset_peak(self) -> None:
        self.inner.reset_peak()

    def release(self) -> None:
        self.inner.release()

    def peak_allocated(self) -> int:
        return ranks_max([self.inner.peak_allocated()])[0]

    def peak_reserved(self) -> int:
        return ranks_max([self.inner.peak_reserved()])[0]


def probe_on_every_rank(step_fn: Callable[[int, int], None], oom_error: type[BaseException]):
    """`step_fn` for a probe run on every rank: an out-of-memory error on any rank is one on all.

    The probe treats an out-of-memory step as "does not fit" and steps the plan down; a rank whose
    step fitted must step down with the one that did not, or the two would train different plans.
    """

    def run(rows: int, tokens_per_row: int) -> None:
        failed: str | None = None
        try:
            step_fn(rows, tokens_per_row)
        except oom_error as exc:
            failed = str(exc).splitlines()[0] if str(exc) else "out of memory"
        if agree_any(failed is not None):
            raise oom_error(failed or "out of memory on another rank of this run")

    return run


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def write_pid(path) -> None:
    """`ranks/rank-N.pid`: where the supervisor sends `sftop stop`'s signal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n", encoding="utf-8")


def read_indexed_cpu_tensors() -> None:
    """CPU ranks (gloo) train on devices "cpu:0", "cpu:1"...: their checkpoints' tensors carry those
    locations, which torch.load only knows as plain "cpu". Teach it that "cpu:N" is the CPU, so
    a resume (on any number of processes) reads them back."""
    import torch.serialization as serialization

    if getattr(read_indexed_cpu_tensors, "done", False):
        return

    def tag(obj):
        return None  # saving is unchanged

    def restore(obj, location: str):
        return obj if location.startswith("cpu:") else None

    serialization.register_package(11, tag, restore)
    read_indexed_cpu_tensors.done = True  # type: ignore[attr-defined]
