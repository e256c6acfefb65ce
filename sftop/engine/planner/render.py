"""`sftop plan` output: the chosen plan, why, and its memory breakdown."""

from __future__ import annotations

from sftop.engine.planner.solve import Plan, rung_label

_LABELS = {
    "weights": "base weights",
    "dequant_transient": "NF4 dequantised weight (transient)",
    "lora_params": "LoRA parameters (fp32)",
    "lora_grads": "LoRA gradients (fp32)",
    "optimizer_states": "optimizer states",
    "cublas_workspace": "cuBLAS workspace",
    "activations": "saved activations",
    "attention_mask": "attention mask + saved SDPA bias",
    "loss_saved": "loss: saved per token",
    "loss_peak": "loss: logits chunk peak",
    "recomputed_layer": "recomputed block (checkpointing)",
    "backward_transient": "backward transient",
    "reference_forward": "DPO reference forward block",
    "graph_pool": "CUDA graphs' pool (step transients)",
    "pixel_values": "images: pixel tensors",
    "vision_activations": "images: vision tower activations",
    "vision_graph_pool": "images: vision tower CUDA graphs' pool",
    "projector_activations": "images: projector activations",
    "vision_lora": "images: vision LoRA + grads + states",
    "vision_forward_transient": "images: vision forward beyond text peak",
    "probe_correction": "probe correction",
    "allocator_margin": "allocator margin",
    "cuda_context": "CUDA context",
}


def render_plan(plan: Plan, color: bool = False, run_time: str | None = None) -> str:
    """`run_time`: the time-and-cost line (planner.runtime.describe_run_time), shown under "why"."""

    def bold(text: str) -> str:
        return f"\033[1m{text}\033[0m" if color else text

    def tone(text: str, ok: bool) -> str:
        if not color:
            return text
        return f"\033[32m{text}\033[0m" if ok else f"\033[33m{text}\033[0m"

    where = plan.device + (f" ({plan.gpu_name})" if plan.gpu_name else "")
    lines = [
        bold(f"Plan for {plan.model_name} on {where}"),
        (
            f"  micro-batches    {plan.effective_batch} rows/step in {plan.grad_accum} micro-batch"
            f"{'es' if plan.grad_accum > 1 else ''} of <= {plan.tokens_per_micro_batch:,} tokens (split by tokens, "
            f"about {plan.micro_batch} rows each; the largest of the run)"
            if getattr(plan, "split_by", "rows") == "tokens"
            else f"  micro-batch      {plan.micro_batch} rows"
            + (
                f" (packed, up to {plan.tokens_per_micro_batch} tokens"
                + ("; flash attention over row boundaries)" if plan.attention == "varlen" else ")")
                if plan.packing
                else f" x {plan.max_length} tokens"
            )
        ),
        f"  accumulation     {plan.grad_accum}  (effective batch {plan.effective_batch})",
        f"  checkpointing    {rung_label(plan.gradient_checkpointing, plan.checkpoint_every_n_layers)}",
        f"  weights          {'NF4 (4-bit)' if plan.load_in_4bit else plan.dtype}, LoRA r={plan.lora_r}, "
        f"optimizer {plan.optimizer}, kernels {'sftop fused' if plan.kernels else 'stock'}",
        f"  peak {'RAM   ' if plan.device == 'cpu' else 'memory'}      {plan.predicted_peak_gib:.2f} GiB of {plan.budget_gib:.2f} GiB budget "
        + tone(f"(headroom {plan.headroom_gib:.2f} GiB)", plan.headroom_gib >= 0),
        *(
            [f"  memory cap       {plan.max_memory_gib:.2f} GiB ({plan.memory_cap}); the trainer is held to it"]
            if plan.max_memory_gib is not None
            else []
        ),
        *_strategy_lines(plan),
        f"  why              {plan.reason}",
        *([f"  time             {run_time}"] if run_time else []),
        "",
        bold("Memory breakdown (GiB)"),
    ]
    width = max(len(v) for v in _LABELS.values())
    for key, value in plan.breakdown.items():
        if value == 0:
            continue
        lines.append(f"  {_LABELS.get(key, key):<{width}}  {value:8.3f}")
    lines.append(f"  {'total (device peak)':<{width}}  {plan.predicted_peak_gib:8.3f}")
    lines.append(f"  {'of which torch allocated':<{width}}  {plan.predicted_allocated_gib:8.3f}")
    fitting = [c for c in plan.candidates if c["fits"]]
    unfit = [c for c in plan.candidates if not c["fits"]]
    if len(plan.candidates) > 1:
        lines += [
            "",
            bold("Candidates that fit (fastest first)"),
            "  micro x accum  checkpointing          peak GiB  rel. time",
        ]
        mine = (plan.micro_batch, plan.gradient_checkpointing, plan.checkpoint_every_n_layers)
        for c in fitting[:10]:
            ident = (c["micro_batch"], c["gradient_checkpointing"], c.get("checkpoint_every_n_layers", 1))
            label = rung_label(c["gradient_checkpointing"], c.get("checkpoint_every_n_layers", 1))
            lines.append(
                f"{'*' if ident == mine else ' '} {c['micro_batch']:>5} x {c['grad_accum']:<5}  {label:<21}  "
                f"{c['predicted_peak_gib']:8.2f}  {c['relative_step_time']:.2f}"
            )
        if len(fitting) > 10:
            lines.append(f"  ... {len(fitting) - 10} slower ones")
        if unfit:
            lines.append(
                f"  {len(unfit)} more need more memory than the budget (up to "
                f"{max(c['predicted_peak_gib'] for c in unfit):.1f} GiB)"
            )
    if plan.notes:
        lines += ["", bold("Notes")] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def _strategy_lines(plan: Plan) -> list[str]:
    """Several processes: the strategy, and each GPU's predicted peak against its own budget."""
    if plan.world_size <= 1:
        return []
    lines = [
        f"  strategy         {plan.strategy.upper()} over {plan.world_size} processes; micro-batch and "
        f"accumulation are per process ({plan.micro_batch} x {plan.grad_accum} x {plan.world_size} = "
        f"{plan.effective_batch})",
        f"                   {plan.strategy_reason}",
    ]
    for gpu in plan.per_gpu:
        name = f" ({gpu['name']})" if gpu.get("name") else ""
        budget = f" of {gpu['budget_gib']:.2f} GiB" if gpu.get("budget_gib") else ""
        lines.append(f"  {gpu['device'] + name:<32} peak {gpu['predicted_peak_gib']:.2f} GiB{budget}")
    return lines
