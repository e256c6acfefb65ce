"""Turn the preset's `[plan]` (possibly "auto") into concrete micro-batch / accumulation / checkpointing."""

from __future__ import annotations

from typing import Any


def make_plan(preset, model_config, row_tokens_mean: float | None = None):
    """The planner's plan; it raises ResourceError itself when nothing fits."""
    from sftop.engine.planner import plan_run

    return plan_run(preset, model_config, row_tokens_mean=row_tokens_mean)


def resolved_plan_section(plan) -> dict[str, Any]:
    return {
        "micro_batch": int(plan.micro_batch),
        "grad_accum": int(plan.grad_accum),
        "gradient_checkpointing": str(plan.gradient_checkpointing),
    }
