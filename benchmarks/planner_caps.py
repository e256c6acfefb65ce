"""Whole runs under several memory caps: the plan chosen, predicted vs measured peak, useful tokens/s.

`python benchmarks/planner_accuracy.py --caps 4,8,12,24 --out DIR` runs this: one `sftop run` of
benchmarks/whole_run.py's data and model per cap (`plan.max_memory_gib`; `none` for no cap), all in
one call on the same GPU, and records per cap the plan the planner chose (micro-batch, accumulation,
checkpointing, how each step's rows are split, the largest micro-batch in tokens), the predicted
peak (allocated and on the device), the measured peak (torch.cuda.max_memory_allocated over the
run, probe included; the most the allocator reserved, at the probe or after a step, plus the CUDA
context as the device's), and useful
tokens per second. Writes planner_caps.json and planner_caps.md to --out.

    python benchmarks/planner_accuracy.py --caps 4,8,12,24 --out /tmp/caps           # ~3 minutes on an H100
    python benchmarks/planner_accuracy.py --caps 4,8 --shapes tiny --rows 16 --out /tmp/smoke   # CPU smoke test
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WHOLE_RUN_SHAPES = ("llama-1b", "tiny")  # benchmarks/whole_run.py's SHAPES
CUDA_CONTEXT_GIB = 0.6  # sftop.engine.planner.estimate.CUDA_CONTEXT_BYTES: outside the allocator's counters


def parse_caps(text: str) -> list[float | None]:
    """ "4,8,12,24" -> [4.0, 8.0, 12.0, 24.0]; "none" (or 0) is a run without a cap."""
    caps: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in ("none", "0", "off"):
            caps.append(None)
            continue
        value = float(item)
        if value <= 0:
            raise ValueError(f"a cap must be positive GiB or 'none', got {item!r}")
        caps.append(value)
    if not caps:
        raise ValueError("--caps needs at least one cap, e.g. 4,8,12,24")
    return caps


def variant_name(cap: float | None) -> str:
    return "uncapped" if cap is None else f"cap-{cap:g}"


def run_caps(
    out: Path,
    caps: list[float | None],
    shape: str,
    rows: int,
    effective_batch: int,
    seed: int,
    extra_sets: list[str] | None = None,
) -> dict:
    """One whole_run.py call (same model, same data) with one sftop row per cap."""
    if shape not in WHOLE_RUN_SHAPES:
        raise SystemExit(
            f"--caps runs whole_run.py's shapes ({', '.join(WHOLE_RUN_SHAPES)}), not {shape!r}: "
            "pass --shapes llama-1b or --shapes tiny"
        )
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(HERE / "whole_run.py"),
        "--out",
        str(out / "runs"),
        "--shape",
        shape,
        "--rows",
        str(rows),
        "--effective-batch",
        str(effective_batch),
        "--seed",
        str(seed),
        "--skip",
        "trl",
        "sftop",
    ]
    for cap in caps:
        sets = [] if cap is None else [f"plan.max_memory_gib={cap:g}"]
        command += ["--variant", variant_name(cap), *sets, *(extra_sets or [])]
    t0 = time.time()
    done = subprocess.run(command)
    report_path = out / "runs" / "whole_run.json"
    whole = json.loads(report_path.read_text()) if report_path.is_file() else {}
    result: dict[str, Any] = {
        "shape": shape,
        "rows": rows,
        "effective_batch": effective_batch,
        "data": whole.get("data"),
        "exit_code": done.returncode,
        "wall_s": round(time.time() - t0, 1),
        "caps": [],
    }
    for cap in caps:
        result["caps"].append(cap_row(cap, whole.get(f"sftop:{variant_name(cap)}") or {}))
    (out / "planner_caps.json").write_text(json.dumps(result, indent=1))
    (out / "planner_caps.md").write_text(markdown(result))
    print(markdown(result))
    return result


def cap_row(cap: float | None, run: dict) -> dict:
    """What one capped run chose, predicted and measured."""
    plan = run.get("plan") or {}
    probe = plan.get("probe") or {}
    row: dict = {"cap_gib": cap, "exit_code": run.get("exit_code"), "failed": run.get("failed")}
    if plan:
        row.update(
            {
                "micro_batch": plan.get("micro_batch"),
                "grad_accum": plan.get("grad_accum"),
                "gradient_checkpointing": plan.get("gradient_checkpointing"),
                "checkpoint_every_n_layers": plan.get("checkpoint_every_n_layers", 1),
                "split_by": plan.get("split_by", "rows"),
                "tokens_per_micro_batch": plan.get("tokens_per_micro_batch"),
                "predicted_allocated_gib": plan.get("predicted_allocated_gib"),
                "predicted_device_gib": plan.get("predicted_peak_gib"),
                "budget_gib": plan.get("budget_gib"),
                "breakdown_gib": plan.get("breakdown"),
            }
        )
    measured = run.get("peak_allocated_gib")
    if measured:
        row["measured_allocated_gib"] = measured
        if row.get("predicted_allocated_gib"):
            row["error_pct"] = round(100 * (row["predicted_allocated_gib"] / measured - 1), 2)
    if probe.get("measured_gib") is not None:
        row["probe_allocated_gib"] = probe["measured_gib"]  # one step at the plan's largest micro-batch
    reserved = [v for v in (probe.get("measured_reserved_gib"), run.get("peak_reserved_gib")) if v is not None]
    if reserved:
        row["reserved_gib"] = max(reserved)
        row["measured_device_gib"] = round(max(reserved) + CUDA_CONTEXT_GIB, 3)
    if run.get("useful_tokens_per_s"):
        row["useful_tokens_per_s"] = round(run["useful_tokens_per_s"], 1)
        row["steps"] = run.get("steps")
    if not run:
        row["status"] = "not run"
    elif run.get("exit_code") != 0 or run.get("failed"):
        row["status"] = f"failed: {run.get('failed') or 'exit ' + str(run.get('exit_code'))}"
    else:
        row["status"] = "ok" if measured else "ok (no GPU: nothing measured)"
    return row


def describe(row: dict) -> str:
    if not row.get("micro_batch"):
        return ""
    every = row.get("checkpoint_every_n_layers") or 1
    ckpt = f"ckpt {row['gradient_checkpointing']}" + (f" 1 in {every}" if every > 1 else "")
    if row.get("split_by") == "tokens":
        plural = "es" if row["grad_accum"] > 1 else ""
        return f"{row['grad_accum']} micro-batch{plural} by tokens, {ckpt}"
    return f"{row['micro_batch']} x {row['grad_accum']}, {ckpt}"


def markdown(result: dict) -> str:
    data = result.get("data") or {}
    lines = [
        f"Whole runs under a memory cap: {result['shape']} shape, {data.get('rows', result['rows'])} chat rows "
        f"({data.get('tokens', '?')} tokens, median {data.get('median', '?')}, max {data.get('max', '?')}), "
        f"{result['effective_batch']} rows per optimizer step, packed. Predicted and measured are allocated "
        "peaks (torch.cuda.max_memory_allocated over the run, probe included); the device peak adds the "
        f"CUDA context ({CUDA_CONTEXT_GIB} GiB) to the most the allocator reserved. error = predicted / measured - 1.",
        "",
        "| cap GiB | plan | tokens | predicted GiB | measured GiB | error | predicted device GiB | measured device GiB "
        "| useful tokens/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value, fmt="{:.2f}"):
        return "" if value is None else fmt.format(value)

    for r in result["caps"]:
        cap = "none" if r["cap_gib"] is None else f"{r['cap_gib']:g}"
        lines.append(
            f"| {cap} | {describe(r)} | {num(r.get('tokens_per_micro_batch'), '{:,}')} | "
            f"{num(r.get('predicted_allocated_gib'))} | {num(r.get('measured_allocated_gib'))} | "
            f"{num(r.get('error_pct'), '{:+.1f}%')} | {num(r.get('predicted_device_gib'))} | "
            f"{num(r.get('measured_device_gib'))} | {num(r.get('useful_tokens_per_s'), '{:,.0f}')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"
