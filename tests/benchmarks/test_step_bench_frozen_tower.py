"""`step_bench.py --frozen-tower`: the vision shapes with LoRA on the language model only (sftop's
default parts), every path; sftop's path skips the frozen tower's backward as `sftop run` does
(sftop/engine/models/vision/frozen_tower.py), which leaves the loss as the stock path's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_bench  # noqa: E402
import vlm_shapes  # noqa: E402


def test_language_only_targets_leave_the_tower_out():
    for shape in ("qwen2.5-vl-3b", "gemma-3-4b"):
        frozen = step_bench._lora_targets(shape, frozen_tower=True)
        assert frozen == vlm_shapes.LANGUAGE_LORA and "visual" not in frozen and "vision_tower" not in frozen
        assert step_bench._lora_targets(shape).startswith(frozen + "|")


def test_a_frozen_tower_run_on_the_cpu(tmp_path):
    out = tmp_path / "frozen.json"
    argv = ["--model", "qwen2.5-vl-tiny", "--device", "cpu", "--batch", "2", "--seq", "96"]
    assert (
        step_bench.main(
            [*argv, "--steps", "2", "--warmup", "1", "--paths", "stock,sftop", "--frozen-tower", "--json", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["frozen_tower"] is True
    stock, sftop = result["results"]
    assert sftop["patch"]["frozen_tower"].startswith("on:")
    # the same arithmetic without the tower's backward: the same losses step for step
    assert stock["losses"] == sftop["losses"] and len(stock["losses"]) == 2
