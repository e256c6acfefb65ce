"""benchmarks/planner_accuracy.py --caps: whole runs under several memory caps, smoke-tested on the
CPU with the tiny shape (the CPU ignores caps and measures no GPU memory; the GPU run is the lead's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from planner_caps import cap_row, markdown, parse_caps  # noqa: E402


def test_parse_caps():
    assert parse_caps("4,8, 12,24") == [4.0, 8.0, 12.0, 24.0]
    assert parse_caps("3.21,none") == [3.21, None]
    with pytest.raises(ValueError):
        parse_caps("-1")
    with pytest.raises(ValueError):
        parse_caps(",")


def test_row_and_table_from_a_recorded_run():
    run = {
        "exit_code": 0,
        "steps": 75,
        "peak_allocated_gib": 3.71,
        "useful_tokens_per_s": 24556.2,
        "plan": {
            "micro_batch": 4,
            "grad_accum": 2,
            "gradient_checkpointing": "on",
            "checkpoint_every_n_layers": 1,
            "split_by": "tokens",
            "tokens_per_micro_batch": 3736,
            "predicted_allocated_gib": 3.9,
            "predicted_peak_gib": 4.6,
            "budget_gib": 8.0,
            "probe": {"measured_gib": 3.7, "measured_reserved_gib": 3.8},
        },
    }
    row = cap_row(8.0, run)
    assert row["error_pct"] == pytest.approx(100 * (3.9 / 3.71 - 1), abs=0.01)
    assert row["measured_device_gib"] == pytest.approx(4.4)
    assert row["status"] == "ok"
    table = markdown({"shape": "llama-1b", "rows": 300, "effective_batch": 8, "data": None, "caps": [row]})
    assert (
        "| 8 | 2 micro-batches by tokens, ckpt on | 3,736 | 3.90 | 3.71 | +5.1% | 4.60 | 4.40 | 24,556 | ok |" in table
    )
    refused = cap_row(2.0, {"exit_code": 1, "failed": "does not fit", "plan": None})
    assert refused["status"] == "failed: does not fit"


@pytest.mark.slow
def test_caps_mode_runs_whole_runs_and_writes_the_table(tmp_path, sftop_home):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "planner_accuracy.py"),
            "--caps",
            "4,none",
            "--shapes",
            "tiny",
            "--rows",
            "16",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "planner_caps.json").read_text())
    assert [r["cap_gib"] for r in result["caps"]] == [4.0, None]
    for r in result["caps"]:
        assert r["status"] == "ok (no GPU: nothing measured)"
        assert r["micro_batch"] * r["grad_accum"] == 8 and r["steps"] == 2
        assert r["split_by"] == "tokens" and r["tokens_per_micro_batch"] > 0 and r["useful_tokens_per_s"] > 0
    table = (tmp_path / "planner_caps.md").read_text()
    assert table.count("\n| ") == 3  # header and two caps
