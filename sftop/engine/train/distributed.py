"""What a rank of a multi-process run does differently: agree with the others, and write its own files.

Every rank must take the same decisions at the same step (stop, save), or the next collective
waits forever for a rank that left: `agree_any` all-reduces a flag so that one rank's stop
request stops them all at the same step. Outside a multi-process run every helper is a no-op.
"""

from __future__ import annotations

import os

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
