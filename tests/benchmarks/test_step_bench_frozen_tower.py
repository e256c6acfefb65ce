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


def test_a_graphed_vision_shape_takes_the_small_logits_chunk_as_sftop_run_does(monkeypatch):
    monkeypatch.delenv("SFTOP_VISION_GRAPHS", raising=False)
    monkeypatch.delenv("SFTOP_CUDA_GRAPHS", raising=False)
    assert step_bench._graphed_vlm("qwen2.5-vl-3b", "sftop")
    assert not step_bench._graphed_vlm("qwen2.5-vl-3b", "sftop-default-loss-chunk")
    assert not step_bench._graphed_vlm("llama-3.2-1b", "sftop")  # text: the default chunk
    monkeypatch.setenv("SFTOP_VISION_GRAPHS", "0")  # what sftop-no-vision-graphs sets
    assert not step_bench._graphed_vlm("qwen2.5-vl-3b", "sftop")
    monkeypatch.setenv("SFTOP_VISION_GRAPHS", "1")
    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")  # what sftop-eager sets
    assert not step_bench._graphed_vlm("qwen2.5-vl-3b", "sftop")
