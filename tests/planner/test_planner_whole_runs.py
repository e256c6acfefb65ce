"""Packed mixed-length whole runs: the memory model against what `sftop run` measured on a GPU.

Every sftop row of a recorded whole run (benchmarks/results/*/whole_run*.json, written by
benchmarks/whole_run.py and benchmarks/planner_accuracy.py --caps) and the forced plans of
docs/peers.md (measured_whole_runs_h100_2026-12-06.json) is re-predicted with the current estimate
at the micro-batch the run was sized for. torch.cuda.max_memory_allocated is what the run measured,
so the prediction compared is the allocated one (the device peak adds the CUDA context and the
allocator's margin, which max_memory_allocated does not see). A run that replayed CUDA graphs holds
one copy of the step's dynamic memory as allocated (the pool's second copy is reserved, idle
between replays) plus the static gradient buffers its captured steps share, which stay allocated
beside the gradients each step makes (docs/planner.md): its prediction is the eager step's plus
that one set of LoRA gradients.

Records dated before 2026-12-03 are left out: their runs held two logits chunks of the fused loss
live at once (fixed on 2026-12-02, docs/planner.md), which today's kernel and model do not.

Band: never under the measurement (an out-of-memory risk), at most 10% over (speed lost on small GPUs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sftop.engine.planner.estimate import GIB, ModelShape, Setup, estimate

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from whole_run import SHAPES  # noqa: E402

FIRST_CURRENT_RECORD = "2026-12-03"
FORCED = json.loads(Path(__file__).with_name("measured_whole_runs_h100_2026-12-06.json").read_text())


def recorded_rows() -> list[dict]:
    rows = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*/**/whole_run*.json")):
        measured_on = path.relative_to(ROOT / "benchmarks" / "results").parts[0][:10]
        if measured_on < FIRST_CURRENT_RECORD:
            continue
        report = json.loads(path.read_text())
        for name in report.get("sftop_rows", ["sftop"]):
            run = report.get(name) or {}
            plan = run.get("plan") or {}
            if plan.get("packing") and run.get("peak_allocated_gib") and not run.get("failed"):
                rows.append(
                    {
                        **plan,
                        # the plan counted the graphs' pool (docs/planner.md): the run replayed them
                        "graphed": "graph_pool" in (plan.get("breakdown") or {}),
                        "shape": report["shape"],
                        "measured_gib": run["peak_allocated_gib"],
                        "name": f"{path.parent.name}/{path.name}:{name}",
                    }
                )
    return rows


def forced_rows() -> list[dict]:
    base = {
        "dtype": "bf16",
        "kernels": True,
        "loss": "fused",
        "attention": "varlen",
        "lora_r": 16,
        "optimizer": "adamw",
        "load_in_4bit": False,
        "varlen_native_gqa": False,
    }
    return [{**base, **r, "name": f"peers.md: {r['name']}"} for r in FORCED["rows"]]


ROWS = recorded_rows() + forced_rows()


def predicted_gib(r: dict) -> float:
    shape = ModelShape.from_config({**SHAPES[r["shape"]], "model_type": "llama"})
    setup = Setup(
        dtype=r["dtype"],
        load_in_4bit=r["load_in_4bit"],
        lora_r=r["lora_r"],
        optimizer=r["optimizer"],
        checkpointing=r["gradient_checkpointing"],
        checkpoint_every=r.get("checkpoint_every_n_layers", 1),
        kernels=r["kernels"],
        loss=r["loss"],
        attention=r["attention"],
        packed=True,
        # runs recorded before plans said so ran torch 2.11, whose varlen API took K and V repeated
        varlen_native_gqa=r.get("varlen_native_gqa", False),
    )
    eager = estimate(shape, setup, r["tokens_per_micro_batch"])
    shared_gradients = eager.terms["lora_grads"] if r.get("graphed") else 0
    return (eager.allocated_bytes + shared_gradients) / GIB


def test_records_are_there():
    assert len(recorded_rows()) >= 2 and len(forced_rows()) == 3


@pytest.mark.parametrize("r", ROWS, ids=lambda r: r["name"])
def test_packed_whole_run_predicted_within_measured_and_10_percent_over(r):
    predicted = predicted_gib(r)
    assert r["measured_gib"] <= predicted <= 1.10 * r["measured_gib"], (
        f"{r['name']}: predicted {predicted:.3f} GiB allocated, measured {r['measured_gib']:.3f} "
        f"({predicted / r['measured_gib'] - 1:+.1%})"
    )
