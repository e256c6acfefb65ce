"""Turn the preset's `[plan]` (possibly "auto") into concrete micro-batch / accumulation / checkpointing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LocalPlan:
    """The subset of the planner's `Plan` the trainer needs (same attribute names)."""

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: str
    device: str = "cpu"
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "effective_batch": self.effective_batch}


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _resolve_plan_without_planner(preset) -> LocalPlan:
    """Used only when `sftop.engine.planner` cannot be imported: no memory model, just safe numbers.

    effective_batch = micro_batch x grad_accum is kept exactly, so the optimisation is the same
    whatever the split.
    """
    plan = preset.plan
    effective = preset.train.effective_batch
    if isinstance(plan.micro_batch, int) and isinstance(plan.grad_accum, int):
        micro, accum = plan.micro_batch, plan.grad_accum
    elif isinstance(plan.micro_batch, int):
        micro = plan.micro_batch
        accum = max(1, effective // micro)
    elif isinstance(plan.grad_accum, int):
        accum = plan.grad_accum
        micro = max(1, effective // accum)
    else:
        micro = _largest_divisor_at_most(effective, 8)
        accum = effective // micro
    checkpointing = plan.gradient_checkpointing if plan.gradient_checkpointing != "auto" else "off"
    return LocalPlan(micro, accum, checkpointing, reason="planner unavailable: default split of effective_batch")


def make_plan(preset, model_config, row_tokens_mean: float | None = None, image_tokens_per_row=None):
    """The planner's plan when available; it raises ResourceError itself when nothing fits.

    image_tokens_per_row: a VLM's exact image tokens per row (from its data check).
    """
    try:
        from sftop.engine.planner import plan_run
    except ImportError:
        return _resolve_plan_without_planner(preset)
    return plan_run(preset, model_config, row_tokens_mean=row_tokens_mean, image_tokens_per_row=image_tokens_per_row)


def resolved_plan_section(plan) -> dict[str, Any]:
    return {
        "micro_batch": int(plan.micro_batch),
        "grad_accum": int(plan.grad_accum),
        "gradient_checkpointing": str(plan.gradient_checkpointing),
    }
