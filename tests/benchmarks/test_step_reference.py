"""whole_run.py --step-reference: the fixed-shape step a whole run is held to, timed at its plan."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import whole_run  # noqa: E402 - benchmarks/ is not a package


def test_the_reference_takes_the_plans_largest_micro_batch_as_full_rows():
    # a token-split plan: 7,296 tokens a micro-batch -> rows of the longest length, rounded
    assert whole_run.reference_shape({"tokens_per_micro_batch": 7296, "gradient_checkpointing": "off"}) == (
        4,
        2048,
        "off",
    )
    # a row-count plan: that many rows of the longest length
    assert whole_run.reference_shape({"micro_batch": 2, "gradient_checkpointing": "offload"}) == (2, 2048, "offload")
    # a micro-batch shorter than one longest row is one row of its own length
    assert whole_run.reference_shape({"tokens_per_micro_batch": 900, "gradient_checkpointing": "on"}) == (
        1,
        900,
        "on",
    )
    assert "no micro-batch" in whole_run.reference_shape({"gradient_checkpointing": "on"})
    assert "no fixed-shape" in whole_run.reference_shape({"micro_batch": 1, "gradient_checkpointing": "layers"})


def test_the_reference_runs_step_bench_and_holds_the_run_to_80_percent(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    row = {
        "plan": {"tokens_per_micro_batch": 96, "gradient_checkpointing": "off"},
        # far below any real step, on any CPU however busy: the target is missed, and the share
        # prints as 0%
        "useful_tokens_per_s": 0.001,
        "peak_allocated_gib": 0.5,
    }
    ref = whole_run.run_step_reference(row, "tiny", env, tmp_path, device="cpu", longest=32)
    assert (ref["batch"], ref["seq"], ref["checkpointing"]) == (3, 32, "off")
    assert ref["tokens_per_s"] > 1.0
    assert ref["whole_over_step"] == 0.001 / ref["tokens_per_s"]
    assert ref["met"] is False
    line = whole_run.step_reference_line(ref, row)
    assert line.startswith("sftop whole run / fixed-shape step (3 x 32, checkpointing off: ")
    assert line.endswith("; the run's peak 0.50 GiB): 0%, target at least 80%: MISSED.")
    assert "nan" not in line  # the CPU's step has no peak: left out, not printed as nan
    # a run at the step's own rate meets it
    fast = {**row, "useful_tokens_per_s": ref["tokens_per_s"] * 0.8}
    ref2 = {**ref, "whole_over_step": 0.8, "met": True}
    assert whole_run.step_reference_line(ref2, fast).endswith("): 80%, target at least 80%: met.")
    gpu = {**ref2, "peak_gib": 2.5}
    assert ", peak 2.50 GiB; the run's peak 0.50 GiB): 80%" in whole_run.step_reference_line(gpu, fast)
    # the run's median step beside it: how far the captured steps themselves get
    steady = {**fast, "step_tokens_per_s_median": ref["tokens_per_s"] * 0.9}
    assert whole_run.step_reference_line(ref2, steady).endswith(
        f"target at least 80%: met. Its median step: {ref['tokens_per_s'] * 0.9:,.0f} tokens/s, 90% of the fixed-shape step."
    )


def test_a_plan_without_a_size_is_not_run(tmp_path):
    ref = whole_run.run_step_reference({"plan": {}}, "tiny", {}, tmp_path, device="cpu")
    assert ref == {"not_run": "the plan names no micro-batch size"}
    assert whole_run.step_reference_line(ref, {}) == (
        "Fixed-shape step reference: not run (the plan names no micro-batch size)."
    )
