"""Plan a run over several processes: the strategy, and each process's share of the batch.

DDP (a whole copy of the model on every GPU, gradients all-reduced) when one GPU's budget holds
the model and its activations; FSDP2 (weights sharded across the GPUs) when only a shard would
fit. Every rank runs the same shapes, so the plan is solved once for the GPU with the least free
memory and holds on the others; `per_gpu` lists each GPU's predicted peak against its own budget.

The preset's effective batch is kept exactly: micro_batch x grad_accum x world_size =
train.effective_batch, so the loss curve of N processes matches one process's. An effective batch
the number of processes does not divide is refused with the counts that would work.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sftop.engine.errors import PresetError, ResourceError
from sftop.engine.gpu import GIB, GpuStatus
from sftop.engine.gpu_select import GpuSelection
from sftop.engine.planner.solve import Plan, _apply_cap, _candidate, _reserve_bytes, plan_run, solve

# FSDP2 runs (sftop/engine/train/fsdp.py): `sftop run` takes a plan that needs it.
FSDP2_RUNS = True
STRATEGIES = ("auto", "ddp", "fsdp2")


def per_rank_batch(effective_batch: int, world_size: int) -> int:
    """Each process's share of the effective batch; PresetError when it does not divide."""
    if effective_batch % world_size == 0:
        return effective_batch // world_size
    lower = effective_batch - effective_batch % world_size
    upper = lower + world_size
    counts = [n for n in range(world_size, 0, -1) if effective_batch % n == 0][:3]
    raise PresetError(
        f"train.effective_batch = {effective_batch} cannot be split evenly over {world_size} processes, so the "
        "effective batch would not be kept exactly",
        where="train.effective_batch / plan.gpus",
        hint=f"Set train.effective_batch to a multiple of {world_size} (e.g. {lower or upper} or {upper}), or "
        f"plan.gpus to {' or '.join(str(n) for n in counts)}",
    )


def _rank_preset(preset: Any, share: int) -> Any:
    train = preset.train.model_copy(update={"effective_batch": share})
    return preset.model_copy(update={"train": train})


def wanted_strategy(preset: Any) -> str:
    return str(getattr(preset.plan, "strategy", "auto") or "auto")


def plan_selection(
    preset: Any, model_config: Any, selection: GpuSelection, strategy: str | None = None, **kwargs: Any
) -> Plan:
    """The plan for `selection`'s processes (kwargs go to plan_run: row_tokens_mean, image_tokens_per_row).

    strategy: "auto" (DDP when it fits, else FSDP2), "ddp" or "fsdp2"; None = the preset's plan.strategy.
    Inside a rank it is the strategy the run was launched with."""
    strategy = strategy or wanted_strategy(preset)
    world = selection.total  # every process on every node
    if world == 1:
        plan = plan_run(preset, model_config, gpus=selection.status(), **kwargs)
        plan.notes += [f"left out {w}" for w in selection.left_out] + selection.notes
        return plan
    share = per_rank_batch(int(preset.train.effective_batch), world)
    try:
        rank_preset = _rank_preset(preset, share)
    except ValueError as exc:  # pragma: no cover - a share of a valid batch is a valid batch
        raise PresetError(str(exc), where="train.effective_batch") from None
    _check_fixed(preset, share, world)
    if selection.device == "cpu":
        cpus: tuple[tuple[str, str | None, str | None, int], ...] = tuple(
            (f"cpu rank {r}", None, None, 0) for r in range(selection.world_size)
        )
        base = plan_run(rank_preset, model_config, gpus=GpuStatus(reason=selection.cpu_reason), **kwargs)
        assert base.context is not None
        sharded = strategy == "fsdp2"
        ctx = replace(
            base.context,
            world_size=world,
            strategy="fsdp2" if sharded else "ddp",
            per_gpu=_budgets(cpus, base.context.budget_bytes),
            shard_bytes=_shard_saving(base.context, world) if sharded else 0,
            strategy_reason=f"{'FSDP2 (plan.strategy = fsdp2)' if sharded else 'DDP'} over {world} CPU processes "
            f"(gloo): {selection.cpu_reason}",
        )
        plan = solve(ctx)
        plan.reason = base.reason
        plan.notes += selection.notes
        return plan
    smallest = min(selection.gpus, key=lambda g: (g.memory_free_bytes or 0, g.index))
    per_gpu: tuple[tuple[str, str | None, str | None, int], ...] = tuple(
        (g.device, g.name, g.uuid, _budget(g)) for g in selection.gpus
    )
    notes = [f"left out {w}" for w in selection.left_out] + selection.notes
    if strategy == "fsdp2":
        return _fsdp2(rank_preset, model_config, smallest, per_gpu, world, notes, None, kwargs)
    try:
        base = plan_run(rank_preset, model_config, gpus=GpuStatus(gpus=[smallest]), **kwargs)
    except ResourceError as ddp_error:
        if strategy == "ddp":
            raise
        return _fsdp2(rank_preset, model_config, smallest, per_gpu, world, notes, ddp_error, kwargs)
    assert base.context is not None
    ctx = replace(
        base.context,
        world_size=world,
        strategy="ddp",
        per_gpu=per_gpu,
        gpu_uuid=None,
        strategy_reason=f"DDP over {world} GPUs: the model and its activations fit each GPU "
        f"(sized for {smallest.device}, the one with the least free memory)",
    )
    ctx.notes = list(ctx.notes) + notes + _node_notes(selection)
    plan = solve(ctx)
    return plan


def _node_notes(selection: GpuSelection) -> list[str]:
    if selection.nodes == 1:
        return []
    return [
        f"{selection.nodes} nodes of {selection.world_size} processes each; per-GPU peaks are this node's "
        f"(node {selection.node_rank})"
    ]


def _budget(gpu: Any) -> int:
    total = gpu.memory_total_bytes or gpu.memory_free_bytes or 0
    return max(0, (gpu.memory_free_bytes or 0) - _reserve_bytes(total))


def _budgets(per_gpu: tuple, budget: int) -> tuple:
    return tuple((dev, name, uuid, budget) for dev, name, uuid, _ in per_gpu)


def _check_fixed(preset: Any, share: int, world: int) -> None:
    """plan.micro_batch and plan.grad_accum are per process: their product times the processes is the batch."""
    mb, ga = preset.plan.micro_batch, preset.plan.grad_accum
    if isinstance(mb, int) and isinstance(ga, int) and mb * ga != share:
        raise PresetError(
            f"plan.micro_batch ({mb}) x plan.grad_accum ({ga}) x {world} processes = {mb * ga * world}, but "
            f"train.effective_batch is {preset.train.effective_batch}",
            where="plan.micro_batch / plan.grad_accum",
            hint=f'They are per process: make micro_batch x grad_accum = {share}, or set one of them to "auto"',
        )


def _shard_saving(ctx: Any, world: int) -> int:
    """Bytes of weights one FSDP2 rank does not hold: the (N-1)/N shards of the others, less the two
    decoder layers it gathers whole at a time (the one computing and the one prefetched)."""
    weights = _candidate(ctx, "off", 1).estimate.terms.get("weights", 0)
    gathered = 2 * weights // max(1, ctx.shape.layers)
    return max(0, int(weights * (world - 1) / world) - gathered)


def _fsdp2(
    rank_preset: Any,
    model_config: Any,
    smallest: Any,
    per_gpu: tuple,
    world: int,
    notes: list[str],
    ddp_error: ResourceError | None,
    kwargs: dict,
) -> Plan:
    """Does a shard of the weights fit where the whole model did not (or plan.strategy = "fsdp2")?
    Then plan FSDP2."""
    from sftop.engine.gpu import GpuInfo

    # FSDP2 runs the stock layers (sftop.engine.train.fsdp.OFF_REASONS): size them, not the fused kernels
    rank_preset = rank_preset.model_copy(update={"train": rank_preset.train.model_copy(update={"kernels": "off"})})
    # Solve with room for any candidate, then against the real budget less the other ranks' shards.
    roomy = GpuInfo(
        index=smallest.index,
        nvml_index=smallest.nvml_index,
        name=smallest.name,
        uuid=smallest.uuid,
        memory_total_bytes=1 << 50,
        memory_used_bytes=0,
        memory_free_bytes=1 << 50,
    )
    uncapped = rank_preset.plan.model_copy(update={"max_memory_gib": None, "max_memory_fraction": None})
    base = plan_run(
        rank_preset.model_copy(update={"plan": uncapped}), model_config, gpus=GpuStatus(gpus=[roomy]), **kwargs
    )
    assert base.context is not None
    weights = _candidate(base.context, "off", 1).estimate.terms.get("weights", 0)
    shard = _shard_saving(base.context, world)
    why = (
        f"the whole model does not fit one GPU ({ddp_error.args[0] if ddp_error.args else ddp_error}), a 1/{world} "
        f"shard of its {weights / GIB:.1f} GiB of weights does"
        if ddp_error is not None
        else f"plan.strategy = fsdp2: each GPU holds 1/{world} of the {weights / GIB:.1f} GiB of weights"
    )
    cap_notes: list[str] = []
    # the user's plan.max_memory_* holds every rank (the roomy solve above could not see it)
    budget, cap = _apply_cap(rank_preset, _budget(smallest), smallest.memory_total_bytes or 0, cap_notes)
    if cap is not None:
        per_gpu = tuple((dev, name, uuid, min(b, cap.bytes)) for dev, name, uuid, b in per_gpu)
    ctx = replace(
        base.context,
        budget_bytes=budget,
        uncapped_budget_bytes=_budget(smallest) if cap is not None else None,
        cap=cap,
        gpu_total_bytes=smallest.memory_total_bytes,
        world_size=world,
        strategy="fsdp2",
        per_gpu=per_gpu,
        shard_bytes=shard,
        gpu_uuid=None,
        strategy_reason=f"FSDP2 over {world} GPUs: {why}",
    )
    ctx.notes = [n for n in ctx.notes if "GiB" not in n or "other processes" not in n] + cap_notes + notes
    try:
        plan = _solve_without_offload(ctx)
    except ResourceError:
        if ddp_error is not None:
            raise ddp_error from None
        raise
    plan.breakdown["fsdp2_shards_elsewhere"] = round(-shard / GIB, 3)
    if rank_preset.model.load_in_4bit:
        where = (
            "each GPU, then sharded"
            if weights <= 0.8 * budget
            else "the CPU (host memory), each GPU receives its shard"
        )
        plan.notes.append(f"FSDP-QLoRA: the {weights / GIB:.1f} GiB of 4-bit weights are quantized on {where}")
    if not FSDP2_RUNS:
        plan.notes.append(
            "FSDP2 is planned but sftop does not run it yet: `sftop run` refuses this plan; "
            "use more or larger GPUs, model.load_in_4bit = true, or a shorter data.max_length"
        )
    return plan


def _solve_without_offload(ctx: Any) -> Plan:
    """FSDP2 recomputes activations on the GPU: offloaded checkpointing is not one of its rungs
    (solve leaves it out), and a preset that asks for it gets "on", with a note."""
    from sftop.engine.train.fsdp import OFF_REASONS

    if ctx.constraints.checkpointing != "offload":
        return solve(ctx)
    plan = solve(replace(ctx, constraints=replace(ctx.constraints, checkpointing="on")))
    plan.notes.append(
        f"plan.gradient_checkpointing = offload became on under FSDP2 ({OFF_REASONS['checkpoint_offload']})"
    )
    return plan


def refuse_unbuilt(plan: Plan) -> None:
    """Raise ResourceError for a plan whose strategy the trainer cannot run yet."""
    if plan.strategy == "fsdp2" and not FSDP2_RUNS:
        raise ResourceError(
            f"{plan.model_name} needs FSDP2 sharding over {plan.world_size} GPUs ({plan.strategy_reason}), and sftop "
            "does not run FSDP2 yet",
            where="plan.gpus",
            hint="Set model.load_in_4bit = true, lower data.max_length or lora.r so that DDP fits "
            "(`sftop plan PRESET` shows it), or use GPUs with more memory",
        )


def plan_preset(preset: Any, model_config: Any, *, gpu_memory_gib: float | None = None, **kwargs: Any) -> Plan:
    """`sftop plan`: the plan for the GPUs `plan.gpus` selects here (or a hypothetical GPU's size)."""
    if gpu_memory_gib is not None:
        return plan_run(preset, model_config, gpu_memory_gib=gpu_memory_gib, **kwargs)
    from sftop.engine.gpu_select import select_gpus

    return plan_selection(preset, model_config, select_gpus(preset.plan), **kwargs)
