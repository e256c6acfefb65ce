"""Turn the preset's `[plan]` (possibly "auto") into concrete micro-batch / accumulation / checkpointing."""

from __future__ import annotations

import os
from typing import Any


def make_plan(preset, model_config, row_tokens_mean: float | None = None, image_tokens_per_row=None):
    """The planner's plan; it raises ResourceError itself when nothing fits.

    image_tokens_per_row: a VLM's exact image tokens per row (from its data check).
    """
    from sftop.engine.gpu_select import PINNED_ENV, rank_info, selection_in_rank
    from sftop.engine.planner import plan_run

    kwargs = dict(row_tokens_mean=row_tokens_mean, image_tokens_per_row=image_tokens_per_row)
    if rank_info()[2] > 1:  # one of several processes: plan for the GPUs the supervisor chose
        from sftop.engine.planner.multi import plan_selection, refuse_unbuilt

        from sftop.engine.train.fsdp import fsdp2_active

        # the strategy the run was launched with (its accelerate config), whatever the preset says
        strategy = "fsdp2" if fsdp2_active() else "ddp"
        plan = plan_selection(preset, model_config, selection_in_rank(), strategy=strategy, **kwargs)
        refuse_unbuilt(plan)
        return plan
    if preset.plan.gpus != "auto" and preset.plan.device != "cpu" and not os.environ.get(PINNED_ENV):
        # a one-process run of the GPU plan.gpus names (not pinned by a supervisor): plan for that one
        from sftop.engine.gpu_select import select_gpus

        selection = select_gpus(preset.plan)
        if selection.world_size == 1 and selection.device == "cuda":
            return plan_run(preset, model_config, gpus=selection.status(), **kwargs)
    if preset.plan.device == "cpu":
        from sftop.engine.gpu import GpuStatus

        return plan_run(preset, model_config, gpus=GpuStatus(reason='plan.device = "cpu"'), **kwargs)
    return plan_run(preset, model_config, **kwargs)


def resolved_plan_section(plan) -> dict[str, Any]:
    return {
        "micro_batch": int(plan.micro_batch),
        "grad_accum": int(plan.grad_accum),
        "gradient_checkpointing": str(plan.gradient_checkpointing),
        # several processes: micro_batch and grad_accum are per process, so their count is part of the plan
        # (and they split each step by rows, the Trainer's sharding: a resume on one process keeps that order)
        **({"gpus": int(plan.world_size), "split_by": "rows"} if getattr(plan, "world_size", 1) > 1 else {}),
    }
