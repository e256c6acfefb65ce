"""The user's GPU memory cap (`plan.max_memory_gib` or `plan.max_memory_fraction`).

A run that shares its GPU (an inference server, a notebook) must stay under a limit the user
chooses, whatever the GPU has free. The cap bounds the device peak the planner sizes (weights,
activations, allocator margin and the CUDA context), so the probe and the out-of-memory step-down,
which judge against the plan's budget, stay under it too; at run time the trainer holds torch's
caching allocator to the cap minus the CUDA context (`allocator_fraction`), so a step that would
grow past it fails as an out-of-memory error inside this process instead of taking memory from
the other one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftop.engine.gpu import GIB
from sftop.engine.planner.estimate import CUDA_CONTEXT_BYTES


@dataclass(frozen=True)
class MemoryCap:
    bytes: int
    key: str  # the preset key that set it
    text: str  # "plan.max_memory_gib = 12" or "plan.max_memory_fraction = 0.5 of 80.0 GiB"

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def memory_cap(plan_section: Any, total_bytes: int | None) -> MemoryCap | None:
    """The cap a preset's `[plan]` sets for a GPU of `total_bytes`, or None without one."""
    gib = getattr(plan_section, "max_memory_gib", None)
    fraction = getattr(plan_section, "max_memory_fraction", None)
    if gib is not None:
        return MemoryCap(int(gib * GIB), "plan.max_memory_gib", f"plan.max_memory_gib = {gib:g}")
    if fraction is not None and total_bytes:
        return MemoryCap(
            int(fraction * total_bytes),
            "plan.max_memory_fraction",
            f"plan.max_memory_fraction = {fraction:g} of {total_bytes / GIB:.1f} GiB",
        )
    return None


def allocator_fraction(cap_bytes: int, total_bytes: int) -> float:
    """What to pass to torch.cuda.set_per_process_memory_fraction so the device peak stays under the cap.

    The fraction limits the caching allocator's reserved memory; the CUDA context lives outside it
    and is taken off first.
    """
    if total_bytes <= 0:
        raise ValueError("the GPU's total memory must be positive")
    usable = max(0, cap_bytes - CUDA_CONTEXT_BYTES)
    return min(1.0, usable / total_bytes)


def hold_to_cap(cap_gib: float | None, device: str, cuda: Any = None) -> float | None:
    """Hold this process's CUDA allocator under `cap_gib` (a plan's `max_memory_gib`) on `device`.

    Returns the fraction set, or None when there is no cap or no CUDA device. `cuda` is
    `torch.cuda` (a parameter so the arithmetic can be checked without a GPU).
    """
    if cap_gib is None or not str(device).startswith("cuda"):
        return None
    if cuda is None:
        import torch

        cuda = torch.cuda
    if not cuda.is_available():
        return None
    index = int(str(device).partition(":")[2] or 0)
    total = int(cuda.get_device_properties(index).total_memory)
    fraction = allocator_fraction(int(cap_gib * GIB), total)
    cuda.set_per_process_memory_fraction(fraction, index)
    return fraction
