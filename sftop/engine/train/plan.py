"""Turn the preset's `[plan]` (possibly "auto") into concrete micro-batch / accumulation / checkpointing."""

from __future__ import annotations

from typing import Any


def make_plan(preset, model_config, row_tokens_mean: float | None = None, image_tokens_per_row=None):
    """The planner's plan; it raises ResourceError itself when nothing fits.

    image_tokens_per_row: a VLM's exact image tokens per row (from its data check).
    """
    from sftop.engine.planner import plan_run

    return plan_run(preset, model_config, row_tokens_mean=row_tokens_mean, image_tokens_per_row=image_tokens_per_row)


def resolved_plan_section(plan) -> dict[str, Any]:
    return {
        "micro_batch": int(plan.micro_batch),
        "grad_accum": int(plan.grad_accum),
        "gradient_checkpointing": str(plan.gradient_checkpointing),
    }
