"""Which GPUs a run trains on (`plan.gpus`, `plan.device`), and so how many processes it starts.

    plan.gpus = "auto"    every visible GPU that no other process is using
    plan.gpus = N         the N free GPUs with the most free memory
    plan.gpus = [0, 2]    exactly these CUDA indices (a busy one is kept, with a note: the user chose it)
    plan.device = "cpu"   train on the CPU; with plan.gpus = N, N CPU processes talking over gloo

A GPU is "in use by another process" when NVML reports more than BUSY_USED_BYTES used on it: a
data-parallel run goes at the pace of its slowest GPU and sizes every rank for the smallest free
memory, so a card another job is using would slow and shrink the whole run. The selection says
why each GPU was left out; the plan shows it.

Inside a rank of a multi-process run (started by `accelerate launch`), the selection is what the
supervisor chose: CUDA_VISIBLE_DEVICES holds exactly those GPUs and WORLD_SIZE says how many.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sftop.engine.errors import PresetError
from sftop.engine.gpu import GIB, GpuInfo, GpuStatus, read_gpus

# More than this used on a GPU means another process holds it (the CUDA context of an idle
# process is about 0.5 GiB; a desktop session a few hundred MiB).
BUSY_USED_BYTES = int(1.0 * GIB)
# Set in each rank's environment by the supervisor: the run is one of several processes.
DISTRIBUTED_ENV = "SFTOP_DISTRIBUTED"
# Set by the supervisor when it pinned a one-GPU run to the GPU plan.gpus names (then the only one visible).
PINNED_ENV = "SFTOP_GPU_PINNED"


@dataclass
class GpuSelection:
    """The processes a run starts and the devices they train on."""

    world_size: int  # processes (one per GPU, or N CPU processes)
    device: str  # "cuda" or "cpu"
    gpus: list[GpuInfo] = field(default_factory=list)  # the chosen GPUs, in rank order
    left_out: list[str] = field(default_factory=list)  # "cuda:1 (...): why"
    notes: list[str] = field(default_factory=list)
    cpu_reason: str | None = None  # why the run is on the CPU
    nodes: int = 1  # machines (plan.nodes), each with world_size processes
    node_rank: int = 0

    @property
    def total(self) -> int:
        """Processes over every node."""
        return self.world_size * self.nodes

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def uuids(self) -> list[str]:
        return [g.uuid or str(g.nvml_index) for g in self.gpus]

    def status(self) -> GpuStatus:
        """The chosen GPUs as the planner reads them."""
        return GpuStatus(gpus=list(self.gpus), reason=self.cpu_reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "device": self.device,
            "backend": self.backend,
            "gpus": [{"device": g.device, "name": g.name, "uuid": g.uuid} for g in self.gpus],
            "left_out": list(self.left_out),
        }


def _busy(gpu: GpuInfo) -> bool:
    return (gpu.memory_used_bytes or 0) > BUSY_USED_BYTES


def _label(gpu: GpuInfo) -> str:
    return f"{gpu.device} ({gpu.name})"


def _why_busy(gpu: GpuInfo) -> str:
    return f"{_label(gpu)}: in use by another process ({(gpu.memory_used_bytes or 0) / GIB:.1f} GiB used)"


def select_gpus(plan: Any, status: GpuStatus | None = None) -> GpuSelection:
    """Resolve `plan.gpus` / `plan.device` (a preset's [plan] section) against the GPUs here, on
    each of `plan.nodes` machines. Raises PresetError when the request cannot be met (names what
    is there and what to set)."""
    selection = _select_here(plan, status)
    selection.nodes, selection.node_rank = int(getattr(plan, "nodes", 1)), int(getattr(plan, "node_rank", 0))
    return selection


def _select_here(plan: Any, status: GpuStatus | None = None) -> GpuSelection:
    wanted = plan.gpus
    if plan.device == "cpu":
        if isinstance(wanted, list):
            raise PresetError(
                f'plan.gpus = {wanted} lists GPUs, but plan.device = "cpu" trains on the CPU',
                where="plan.gpus",
                hint="Give a number of CPU processes (plan.gpus = 2), or remove plan.device",
            )
        n = 1 if wanted == "auto" else int(wanted)
        return GpuSelection(
            world_size=n,
            device="cpu",
            cpu_reason='plan.device = "cpu"',
            notes=[f"{n} CPU processes (gloo)"] if n > 1 else [],
        )
    status = status if status is not None else read_gpus()
    gpus = [g for g in status.gpus if g.memory_free_bytes is not None]
    if not gpus:
        reason = status.reason or "no GPU is visible"
        if wanted == "auto" or wanted == 1:
            return GpuSelection(world_size=1, device="cpu", cpu_reason=reason)
        raise PresetError(
            f"plan.gpus = {wanted} asks for GPUs, but none is usable here ({reason})",
            where="plan.gpus",
            hint='Run on a machine with NVIDIA GPUs, set plan.gpus = "auto" to train on the CPU, or set '
            'plan.device = "cpu" to start that many CPU processes (gloo)',
        )
    if isinstance(wanted, list):
        by_index = {g.index: g for g in gpus}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            have = ", ".join(str(i) for i in sorted(by_index)) or "none"
            raise PresetError(
                f"plan.gpus = {wanted}: no usable GPU with index {missing[0]} (visible: {have})",
                where="plan.gpus",
                hint='Use indices `sftop doctor` lists, or "auto"',
            )
        chosen = [by_index[i] for i in wanted]
        notes = [f"{_why_busy(g)}; kept because plan.gpus names it" for g in chosen if _busy(g)]
        left = [f"{_label(g)}: not in plan.gpus" for g in gpus if g.index not in wanted]
        return GpuSelection(world_size=len(chosen), device="cuda", gpus=chosen, left_out=left, notes=notes)
    free = [g for g in gpus if not _busy(g)]
    left = [_why_busy(g) for g in gpus if _busy(g)]
    if wanted == "auto":
        if not free:
            # every GPU is shared: train on the one with the most free memory, as a one-GPU run does
            # (the plan notes what other processes hold on it)
            best = status.best()
            assert best is not None
            return GpuSelection(
                world_size=1, device="cuda", gpus=[best], left_out=[w for w in left if not w.startswith(_label(best))]
            )
        return GpuSelection(
            world_size=len(free), device="cuda", gpus=sorted(free, key=lambda g: g.index), left_out=left
        )
    n = int(wanted)
    if n > len(free):
        raise PresetError(
            f"plan.gpus = {n}, but only {len(free)} of the {len(gpus)} visible GPUs are free"
            + (f" ({'; '.join(left)})" if left else ""),
            where="plan.gpus",
            hint=f'Set plan.gpus = {max(1, len(free))} or "auto", list the GPUs to use (plan.gpus = [0, 1]), '
            "or free the busy ones",
        )
    ranked = sorted(free, key=lambda g: (-(g.memory_free_bytes or 0), g.index))
    chosen = sorted(ranked[:n], key=lambda g: g.index)
    left += [f"{_label(g)}: plan.gpus = {n} takes the {n} with the most free memory" for g in ranked[n:]]
    return GpuSelection(world_size=n, device="cuda", gpus=chosen, left_out=left)


def rank_info(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process; (0, 0, 1) outside a multi-process run."""
    environ = os.environ if env is None else env
    if not environ.get(DISTRIBUTED_ENV):
        return 0, 0, 1
    return (int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0")), int(environ.get("WORLD_SIZE", "1")))


def selection_in_rank(env: Mapping[str, str] | None = None, status: GpuStatus | None = None) -> GpuSelection:
    """The selection as a rank sees it: the supervisor left exactly the chosen GPUs visible."""
    environ = os.environ if env is None else env
    _, _, world = rank_info(environ)
    local = int(environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(1, world // max(1, local))
    if environ.get(DISTRIBUTED_ENV) == "cpu":
        return GpuSelection(world_size=local, device="cpu", cpu_reason='plan.device = "cpu"', nodes=nodes)
    status = status if status is not None else read_gpus()
    return GpuSelection(world_size=local, device="cuda", gpus=list(status.gpus), nodes=nodes)
