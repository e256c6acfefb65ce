"""How long a planned run takes and what it costs: an estimate, calibrated on measured runs.

The planner's step-time model (`solve.step_time_s`) counts each step's FLOPs for the chosen
model, adapter, checkpointing and batch (forward, input-gradient backward, attention, recomputed
blocks, NF4 dequantisation, launch costs) at a nominal matmul rate; it was built to rank plans, so
its seconds are not wall-clock seconds. Measured runs turn it into wall time:

    run seconds = startup + steps x (compute factor x modelled step + per-step overhead)

- compute factor: measured step time / modelled step time of single training steps, for the
  GPU family the measurements ran on (H100/H200: same 16-bit tensor peak);
- per-step overhead: what a whole `sftop run` spends per optimizer step beyond that (the trainer
  loop, logging, data collation), from a whole measured run;
- startup: that run's time before its first step (building the model, tokenizing, compiling).

Other GPUs are scaled by their 16-bit tensor peak against the measured family's: an
extrapolation, and the estimate says so. Everything here is torch-free, as the planner is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sftop.engine.durations import format_duration

# Single training steps measured on one H200 (docs/benchmarks.md, "Training step: 2026-12-03"):
# (model, 4-bit, rows x tokens, checkpointing, measured tokens/s) with sftop's path.
MEASURED_STEPS = (
    ("meta-llama/Llama-3.1-8B", False, 2, 2048, "offload", 13_169),
    ("meta-llama/Llama-3.1-8B", True, 2, 2048, "offload", 12_266),
    ("meta-llama/Llama-3.2-1B", False, 4, 2048, "offload", 68_058),
    ("meta-llama/Llama-3.2-1B", True, 4, 2048, "offload", 66_113),
)
# The whole run measured on the same H200 (docs/benchmarks.md, "Whole run: 2026-12-02"): Llama-3.2-1B
# shape, 300 chat rows of 443.6 tokens on average packed 8 to a step with varlen attention and no
# checkpointing, 38 steps in 5.82 s of training, 29.33 s from start to end.
WHOLE_RUN: dict[str, Any] = dict(
    model="meta-llama/Llama-3.2-1B", rows_per_step=8, row_tokens_mean=443.6, steps=38, train_s=5.819, runtime_s=29.33
)

# The 16-bit (bf16/fp16, dense, fp32 accumulate) tensor peaks the vendors publish, in TFLOP/s:
# an estimate for another GPU scales the measured family's factor by these. Most specific first.
TENSOR_PEAK_TFLOPS = (
    ("H200", "H100/H200", 989.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100", "H100/H200", 989.0),
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.0),
    ("L4", "L4", 121.0),
    ("RTX 4090", "RTX 4090", 165.0),
    ("RTX 3090", "RTX 3090", 71.0),
    ("A10", "A10", 125.0),
)
MEASURED_FAMILY = "H100/H200"
MEASURED_PEAK_TFLOPS = 989.0


@dataclass(frozen=True)
class Calibration:
    compute_factor: float  # wall seconds per modelled second of a step's compute, on the measured family
    step_overhead_s: float  # per optimizer step in a whole run, beyond the compute
    startup_s: float  # before the first step
    spread: float  # the measured steps' largest relative distance from the factor


def _modelled_step_s(
    model: str, load_in_4bit: bool, rows: int, row_tokens: float, checkpointing: Any, packed: bool, attention: Any
) -> float:
    from sftop.engine.planner.estimate import ModelShape, Setup
    from sftop.engine.planner.known_shapes import known_config
    from sftop.engine.planner.solve import step_time_s

    shape = ModelShape.from_config(known_config(model))
    setup = Setup(load_in_4bit=load_in_4bit, checkpointing=checkpointing, attention=attention, packed=packed)
    return step_time_s(
        shape, setup, checkpointing, rows, 1, row_tokens, int(row_tokens) if not packed else 2048, packed
    )


_calibration: Calibration | None = None


def calibration() -> Calibration:
    """The factors, derived from the measurements above with the current step-time model (so a
    change to the model re-calibrates instead of silently drifting from what was measured)."""
    global _calibration
    if _calibration is None:
        ratios = []
        for model, nf4, rows, seq, checkpointing, tokens_s in MEASURED_STEPS:
            modelled = _modelled_step_s(model, nf4, rows, seq, checkpointing, packed=False, attention="sdpa")
            ratios.append(rows * seq / tokens_s / modelled)
        factor = sum(ratios) / len(ratios)
        w = WHOLE_RUN
        modelled = _modelled_step_s(
            w["model"], False, w["rows_per_step"], w["row_tokens_mean"], "off", packed=True, attention="varlen"
        )
        overhead = w["train_s"] / w["steps"] - factor * modelled
        _calibration = Calibration(
            compute_factor=factor,
            step_overhead_s=max(0.0, overhead),
            startup_s=w["runtime_s"] - w["train_s"],
            spread=max(abs(r / factor - 1) for r in ratios),
        )
    return _calibration


def gpu_family(gpu_name: str | None) -> tuple[str, float] | None:
    """(family, 16-bit tensor peak TFLOP/s) of a GPU by its NVML name, or None when not known."""
    if not gpu_name:
        return None
    for needle, family, peak in TENSOR_PEAK_TFLOPS:
        if needle.lower() in gpu_name.lower():
            return family, peak
    return None


@dataclass(frozen=True)
class RunTime:
    """A run's estimated wall time and cost (an estimate: see the module's docstring)."""

    step_s: float
    steps: int | None  # None: the length depends on the data's row count, which is not known here
    wall_s: float | None  # startup + steps x step_s
    cost: float | None  # at plan.price_per_gpu_hour, when set and the length is known
    price_per_gpu_hour: float | None
    family: str
    measured: bool  # this GPU's family is the one measured; otherwise scaled by its tensor peak

    @property
    def basis(self) -> str:
        if self.measured:
            return f"calibrated on {MEASURED_FAMILY} runs"
        return f"scaled from {MEASURED_FAMILY} runs by the {self.family}'s tensor peak, not measured on it"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_s": round(self.step_s, 4),
            "steps": self.steps,
            "wall_s": None if self.wall_s is None else round(self.wall_s, 1),
            "cost": None if self.cost is None else round(self.cost, 2),
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "basis": self.basis,
        }


def run_steps(preset: Any, plan: Any, train_rows: int | None) -> int | None:
    """Optimizer steps the run will take: train.max_steps, else epochs over `train_rows` rows in
    micro-batches of plan.micro_batch, grad_accum of them a step (as the trainer counts)."""
    if preset.train.max_steps:
        return int(preset.train.max_steps)
    if not train_rows:
        return None
    per_epoch = max(1, math.ceil(math.ceil(train_rows / plan.micro_batch) / plan.grad_accum))
    return max(1, math.ceil(per_epoch * float(preset.train.epochs)))


def estimate_run_time(
    plan: Any, preset: Any, train_rows: int | None = None, gpu_name: str | None = None
) -> RunTime | None:
    """The run's estimated time and cost, or None where there is no basis (the CPU, whose speed
    varies too much between machines, or a GPU whose tensor peak is not known). `gpu_name`
    replaces the plan's GPU (a hypothetical one, `sftop plan --gpu-memory 80 --gpu H100`)."""
    if plan.device == "cpu" or _multimodal(plan):
        return None
    known = gpu_family(gpu_name or plan.gpu_name)
    if known is None:
        return None
    family, peak = known
    cal = calibration()
    step_s = cal.compute_factor * (MEASURED_PEAK_TFLOPS / peak) * plan.modelled_step_s + cal.step_overhead_s
    steps = run_steps(preset, plan, train_rows)
    wall_s = cal.startup_s + steps * step_s if steps is not None else None
    price = getattr(preset.plan, "price_per_gpu_hour", None)
    cost = wall_s / 3600 * price if wall_s is not None and price is not None else None
    return RunTime(
        step_s=step_s,
        steps=steps,
        wall_s=wall_s,
        cost=cost,
        price_per_gpu_hour=price,
        family=family,
        measured=family == MEASURED_FAMILY,
    )


def _multimodal(plan: Any) -> bool:
    context = getattr(plan, "context", None)
    return bool(context is not None and context.shape.multimodal)


def describe_run_time(rt: RunTime | None, plan: Any = None) -> str:
    """One line for `sftop plan` and the wizard: the estimate, or why there is none."""
    if rt is None:
        if plan is not None and plan.device == "cpu":
            return "no time estimate on the CPU (speeds differ too much between machines); the dashboard shows the ETA from the measured pace"
        if plan is not None and _multimodal(plan):
            # The measured runs are text models; a VLM's vision tower can take most of a step.
            return "no time estimate for vision-language models yet; the dashboard shows the ETA from the measured pace"
        known = ", ".join(dict.fromkeys(needle for needle, _, _ in TENSOR_PEAK_TFLOPS))
        return (
            f"no time estimate for this GPU (its speed is not known to sftop; `sftop plan --gpu NAME` "
            f"takes one of {known}); the dashboard shows the ETA from the measured pace"
        )
    if rt.wall_s is None:
        per = 100 * rt.step_s
        line = f"estimate {format_duration(per)} per 100 steps"
        if rt.price_per_gpu_hour is not None:
            line += f", {per / 3600 * rt.price_per_gpu_hour:.2f} per 100 steps at {rt.price_per_gpu_hour:g}/GPU-hour"
        return line + " (train.epochs: the steps follow from the data's rows, which the wizard counts)"
    line = f"estimate {format_duration(rt.wall_s)} for {rt.steps:,} steps ({rt.step_s:.2f} s a step)"
    if rt.cost is not None:
        line += f", cost ≈ {rt.cost:.2f} at {rt.price_per_gpu_hour:g}/GPU-hour"
    return line


def data_for_estimate(result: Any) -> tuple[int | None, float | None]:
    """(train rows, mean tokens per row) from a data check, for the step count and the step-time
    model; a quick check of the first rows is scaled to the whole source."""
    if result is None or getattr(result, "stats", None) is None:
        return None, None
    stats = result.stats
    mean = stats.tokens / stats.rows if stats.rows else None
    rows = stats.train_rows
    if getattr(result, "quick", False) and result.rows_read:
        rows = round(rows * result.rows_in_source / result.rows_read)
    return (rows or None), mean
