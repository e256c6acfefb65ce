"""Check a plan against the real GPU while the run starts, and step it down instead of crashing.

The trainer runs one probe step at the plan's largest shape (`probe_shape`), reads
`torch.cuda.max_memory_allocated`/`max_memory_reserved`, and asks `check_probe` whether that fits.
If not, the verdict carries the next smaller plan (re-solved with the measured correction); a
mid-run `torch.cuda.OutOfMemoryError` goes through `on_oom`. The effective batch never changes.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Protocol

from sftop.engine.errors import ResourceError
from sftop.engine.gpu import GIB
from sftop.engine.planner.estimate import CUDA_CONTEXT_BYTES, Checkpointing
from sftop.engine.planner.solve import (
    Constraints,
    Plan,
    _candidate,
    _plan_from,
    divisors,
    memory_rank,
    rungs,
    solve,
)


def probe_shape(plan: Plan) -> tuple[int, int]:
    """(rows, tokens per row) of the probe batch: the biggest micro-batch the plan can meet.

    With packing the trainer packs up to `micro_batch` rows into one padding-free row, so the
    worst case is one row of `tokens_per_micro_batch` tokens; padded batches are `micro_batch`
    rows of `max_length`.
    """
    if plan.packing:
        return 1, plan.tokens_per_micro_batch
    return plan.micro_batch, plan.max_length


@dataclass
class ProbeVerdict:
    ok: bool
    measured_gib: float  # max_memory_allocated
    measured_reserved_gib: float | None
    predicted_gib: float  # plan.predicted_allocated_gib
    ratio: float  # measured / predicted allocated
    reason: str
    next_plan: Plan | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_plan"] = None if self.next_plan is None else self.next_plan.to_dict()
        return data


def check_probe(plan: Plan, max_allocated_bytes: int, max_reserved_bytes: int | None = None) -> ProbeVerdict:
    """Does the measured probe peak fit the plan's budget? If not, which plan to probe next.

    Fit is judged on the device: reserved memory (or allocated plus the allocator margin) plus
    the CUDA context must stay within the budget. The next plan is re-solved with the measured
    correction applied to every candidate, restricted to plans no larger than this one; when the
    correction still leaves nothing, `step_down` is the fallback. Raises ResourceError when there
    is nothing smaller to try.
    """
    measured = max_allocated_bytes / GIB
    reserved = None if max_reserved_bytes is None else max_reserved_bytes / GIB
    predicted = plan.predicted_allocated_gib
    ratio = measured / predicted if predicted > 0 else 1.0
    margin = plan.breakdown.get("allocator_margin", 0.0)
    device_peak = (reserved if reserved is not None else measured + margin) + CUDA_CONTEXT_BYTES / GIB
    if plan.device == "cpu" or device_peak <= plan.budget_gib:
        return ProbeVerdict(
            True,
            round(measured, 3),
            None if reserved is None else round(reserved, 3),
            predicted,
            round(ratio, 3),
            f"probe peak {measured:.2f} GiB allocated (predicted {predicted:.2f}); "
            f"{device_peak:.2f} GiB on the device fits the {plan.budget_gib:.2f} GiB budget",
        )
    reason = (
        f"probe peak {device_peak:.2f} GiB on the device is over the {plan.budget_gib:.2f} GiB budget "
        f"(allocated {measured:.2f} GiB, predicted {predicted:.2f})"
    )
    return ProbeVerdict(
        False,
        round(measured, 3),
        None if reserved is None else round(reserved, 3),
        predicted,
        round(ratio, 3),
        reason,
        _smaller_plan(plan, max(ratio, 1.0), reason),
    )


def _smaller_plan(plan: Plan, calibration: float, reason: str) -> Plan:
    ctx = plan.context
    if ctx is None:
        return step_down(plan, reason)
    ctx = replace(ctx, calibration=ctx.calibration * calibration, constraints=Constraints())
    # Only plans that need less memory than the one that failed: fewer rows, or more recomputation.
    rank = memory_rank(plan.gradient_checkpointing, plan.checkpoint_every_n_layers)
    allowed = [
        (m, b, n)
        for m, n in rungs(ctx.shape.layers)
        for b in divisors(ctx.effective_batch)
        if (b < plan.micro_batch and memory_rank(m, n) >= rank) or (b <= plan.micro_batch and memory_rank(m, n) > rank)
    ]
    candidates = [_candidate(ctx, m, b, n) for m, b, n in allowed]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return step_down(plan, reason)
    chosen = min(fitting, key=lambda c: c.key())
    return _plan_from(ctx, chosen, candidates, f"stepped down: {reason}")


def step_down(plan: Plan, reason: str = "stepped down") -> Plan:
    """The next smaller plan with the same effective batch, without consulting the budget.

    Halve the micro-batch (to the largest divisor of the effective batch at most half of it) and
    grow accumulation to match; at micro-batch 1, recompute more (off -> every 2nd block -> every
    block -> offload).
    """
    e = plan.effective_batch // max(1, plan.world_size)  # one process's share
    every = plan.checkpoint_every_n_layers
    if plan.micro_batch > 1:
        smaller = max(d for d in divisors(e) if d <= plan.micro_batch // 2)
        mode = plan.gradient_checkpointing
    else:
        rank = memory_rank(plan.gradient_checkpointing, every)
        # Coarse steps, since each may cost a restart: half the blocks, every block, then offload.
        ladder: list[tuple[Checkpointing, int]] = [("on", 2), ("on", 1), ("offload", 1)]
        stronger = [(m, n) for m, n in ladder if memory_rank(m, n) > rank]
        if not stronger:
            raise ResourceError(
                f"{plan.model_name or 'The model'} does not fit on {plan.device} even at micro-batch 1 with offloaded "
                f"checkpointing ({reason})",
                where="GPU memory",
                hint=(
                    f"Raise {plan.memory_cap.split(' = ')[0]} (now {plan.max_memory_gib:.2f} GiB) or remove it; or set "
                    if plan.memory_cap
                    else "Set "
                )
                + "model.load_in_4bit = true, lower data.max_length, or use a bigger GPU; "
                "`sftop plan PRESET --gpu-memory GIB` shows what fits",
            )
        smaller, (mode, every) = 1, stronger[0]
    ctx = plan.context
    if ctx is None:
        return replace(
            plan,
            micro_batch=smaller,
            grad_accum=e // smaller,
            tokens_per_micro_batch=smaller * plan.max_length,
            gradient_checkpointing=mode,
            checkpoint_every_n_layers=every,
            reason=f"stepped down: {reason}",
        )
    chosen = _candidate(ctx, mode, smaller, every)
    return _plan_from(ctx, chosen, [chosen], f"stepped down: {reason}")


def on_oom(plan: Plan, step: int | None = None) -> Plan:
    """After torch.cuda.OutOfMemoryError mid-run: half the micro-batch, double the accumulation.

    Record it as PlanChanged(step, reason=new.reason, old=plan.to_dict(), new=new.to_dict()).
    """
    where = f" at step {step}" if step is not None else ""
    return step_down(plan, f"out of memory{where}")


class DeviceMemory(Protocol):
    """The allocator counters a probe reads; `CudaMemory` is the real one."""

    oom_error: type[BaseException]

    def reset_peak(self) -> None: ...

    def peak_allocated(self) -> int: ...

    def peak_reserved(self) -> int: ...

    def release(self) -> None: ...


class CudaMemory:
    """torch.cuda's counters for one device."""

    def __init__(self, device: str) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.oom_error = torch.cuda.OutOfMemoryError

    def reset_peak(self) -> None:
        self._torch.cuda.reset_peak_memory_stats(self.device)

    def peak_allocated(self) -> int:
        return int(self._torch.cuda.max_memory_allocated(self.device))

    def peak_reserved(self) -> int:
        return int(self._torch.cuda.max_memory_reserved(self.device))

    def release(self) -> None:
        self._torch.cuda.empty_cache()


def run_probe(
    plan: Plan,
    step_fn: Callable[[int, int], None],
    *,
    memory: DeviceMemory | None = None,
    on_change: Callable[[Plan, Plan, str], None] | None = None,
    max_tries: int = 8,
) -> tuple[Plan, list[ProbeVerdict]]:
    """Probe the plan's largest micro-batch, stepping down until one fits; returns (plan, verdicts).

    `step_fn(rows, tokens_per_row)` must run one full optimizer step (forward, backward,
    optimizer.step, zero_grad(set_to_none=True)) on a batch of that shape and drop its tensors.
    An out-of-memory error in it counts as "does not fit". `on_change(old, new, reason)` is called
    before each step-down (write PlanChanged there). CPU plans are returned unprobed. Raises
    ResourceError when even the smallest plan does not fit.
    """
    if plan.device == "cpu":
        return plan, []
    memory = memory or CudaMemory(plan.device)
    verdicts: list[ProbeVerdict] = []
    for _ in range(max_tries):
        memory.release()
        memory.reset_peak()
        failed: str | None = None
        try:
            step_fn(*probe_shape(plan))
        except memory.oom_error as exc:
            failed = str(exc).splitlines()[0] if str(exc) else "out of memory"
        # Outside the except block: its traceback would keep the failed step's tensors alive.
        gc.collect()
        memory.release()
        if failed is None:
            verdict = check_probe(plan, memory.peak_allocated(), memory.peak_reserved())
        else:
            reason = f"the probe step ran out of memory ({failed[:120]})"
            measured = memory.peak_allocated() / GIB
            verdict = ProbeVerdict(
                False,
                round(measured, 3),
                round(memory.peak_reserved() / GIB, 3),
                plan.predicted_allocated_gib,
                round(measured / max(plan.predicted_allocated_gib, 1e-9), 3),
                reason,
                _smaller_plan(plan, 1.25, reason),
            )
        verdicts.append(verdict)
        if verdict.ok:
            return plan, verdicts
        new = verdict.next_plan
        assert new is not None  # _smaller_plan raises when there is nothing smaller
        if on_change is not None:
            on_change(plan, new, verdict.reason)
        plan = new
    raise ResourceError(
        f"{plan.model_name or 'The model'} still does not fit on {plan.device} after {max_tries} smaller plans",
        where="GPU memory",
        hint="Set model.load_in_4bit = true, lower data.max_length, or use a bigger GPU",
    )


__all__ = [
    "CudaMemory",
    "DeviceMemory",
    "ProbeVerdict",
    "check_probe",
    "on_oom",
    "probe_shape",
    "run_probe",
    "step_down",
    "solve",
]
