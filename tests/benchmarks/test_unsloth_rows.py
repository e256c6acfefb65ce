"""benchmarks/whole_run.py and step_bench.py measure Unsloth beside sftop in one command: the options
parse, an Unsloth row that cannot run says why while the rest runs, the capped sftop row gets the
peer's measured peak as plan.max_memory_gib, and the summary's ratios and targets are right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import step_bench  # noqa: E402
import whole_run  # noqa: E402

NO_UNSLOTH = pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="Unsloth is installed here")
MISSING = "ModuleNotFoundError: No module named 'unsloth'"


def _cells(line: str) -> int:
    return line.count("|") - 1


def test_whole_run_refuses_unknown_rows_and_rows_of_another_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        whole_run.main(["--out", str(tmp_path), "--paths", "trl,liger"])
    assert exc.value.code == 2 and "unknown row(s) liger in --paths" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        whole_run.main(
            ["--out", str(tmp_path), "--paths", "sftop", "--cap-at-peer", "unsloth-2x4", "--effective-batch", "4"]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unsloth-2x4 trains on 8 rows per optimizer step, not --effective-batch 4" in err
    with pytest.raises(SystemExit):
        whole_run.main(["--out", str(tmp_path), "--cap-at-peer", "unsloth-4x2"])
    assert not any(tmp_path.iterdir())  # refused before building anything


def test_capped_row_is_held_to_the_peers_peak():
    from sftop.engine.presets.loader import apply_overrides

    name, sets = whole_run.capped_row({"unsloth-8x1": {"peak_allocated_gib": 3.214567}}, "unsloth-8x1")
    assert (name, sets) == ("sftop:at-unsloth-8x1-peak", ["plan.max_memory_gib=3.2145"])
    assert apply_overrides({}, sets) == {"plan": {"max_memory_gib": 3.2145}}  # as `sftop run --set` reads it
    # with the CUDA context on top, for equal device footprints
    assert whole_run.capped_row({"unsloth-8x1": {"peak_allocated_gib": 3.214567}}, "unsloth-8x1", 0.6) == (
        "sftop:at-unsloth-8x1-peak+0.6",
        ["plan.max_memory_gib=3.8145"],
    )
    assert whole_run.capped_row({"unsloth-8x1": {"peak_allocated_gib": 3.21}}, "unsloth-8x1", 0.6)[1] == [
        "plan.max_memory_gib=3.81"
    ]
    name, why = whole_run.capped_row({"unsloth-8x1": {"unavailable": MISSING}}, "unsloth-8x1")
    assert why == f"not run: unsloth-8x1 has no measured peak (Unsloth cannot be imported: {MISSING})"
    assert whole_run.capped_row({}, "unsloth-2x4")[1] == "not run: unsloth-2x4 has no measured peak (it did not run)"


@NO_UNSLOTH
def test_unsloth_rows_say_why_they_did_not_run_and_the_capped_row_too(tmp_path):
    out = tmp_path / "whole"
    assert (
        whole_run.main(
            [
                "--out",
                str(out),
                "--shape",
                "tiny",
                "--rows",
                "24",
                "--paths",
                "unsloth-2x4",
                "--cap-at-peer",
                "unsloth-8x1",
            ]
        )
        == 0
    )
    report = json.loads((out / "whole_run.json").read_text())
    assert report["peer_rows"] == ["unsloth-8x1", "unsloth-2x4"]  # the capped peer added to --paths
    assert report["unsloth-8x1"]["unavailable"] == MISSING and report["unsloth-2x4"]["unavailable"] == MISSING
    assert report["sftop:at-unsloth-8x1-peak"]["not_run"].startswith("not run: unsloth-8x1 has no measured peak")
    assert "trl" not in report and "sftop" not in report
    table = (out / "whole_run.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert rows[1] == (
        f"| unsloth-8x1 | not measured: Unsloth cannot be imported here ({MISSING}); install it, or "
        "pass --peer-pythonpath with the folders holding it and the TRL it accepts | | | | | | |"
    )
    assert rows[3].startswith("| sftop:at-unsloth-8x1-peak | not run: unsloth-8x1 has no measured peak")
    assert {_cells(line) for line in rows} == {8}


def test_summary_ratios_and_targets_against_unsloth(tmp_path, monkeypatch):
    """main's wiring with the GPU measurements replaced by fixed numbers: the peer runs first, the
    capped sftop row gets its peak as the cap, and the table shows each ratio and target."""
    calls = []

    def fake_unsloth(name, model_dir, data, out, seed, peer_pythonpath, pythonpath):
        calls.append((name, peer_pythonpath))
        rate = {"unsloth-8x1": 10_000.0, "unsloth-2x4": 5_000.0}[name]
        return {
            "train_s": 9424 / rate,
            "useful_tokens_per_s": rate,
            "steps": 3,
            "peak_allocated_gib": 3.21,
            "padding_free": True,
            "versions": {"unsloth": "2026.10.9"},
            "wall_s": 30.0,
        }

    def fake_sftop(preset_path, run_dir, sets, env, out, data_tokens, profile=None, stacks=False):
        calls.append((run_dir.name, sets))
        cap = next((float(s.split("=")[1]) for s in sets if s.startswith("plan.max_memory_gib=")), None)
        rate, peak = (15_000.0, 3.4) if cap else (41_000.0, 18.9)  # capped: under 2x and over its cap
        return {
            "train_s": data_tokens / rate,
            "useful_tokens_per_s": rate,
            "steps": 3,
            "peak_allocated_gib": peak,
            "plan": {"micro_batch": 8, "grad_accum": 1, "gradient_checkpointing": "offload", "max_memory_gib": cap},
            "overrides": sets,
            "wall_s": 20.0,
        }

    monkeypatch.setattr(whole_run, "run_unsloth", fake_unsloth)
    monkeypatch.setattr(whole_run, "run_sftop", fake_sftop)
    out = tmp_path / "whole"
    assert (
        whole_run.main(
            [
                "--out",
                str(out),
                "--shape",
                "tiny",
                "--rows",
                "24",
                "--paths",
                "sftop,unsloth-8x1,unsloth-2x4",
                "--cap-at-peer",
                "unsloth-8x1",
                "--cap-extra-gib",
                "0",
                "0.6",
                "--peer-pythonpath",
                "/peer/trl:/peer",
            ]
        )
        == 0
    )
    assert calls == [
        ("unsloth-8x1", "/peer/trl:/peer"),
        ("unsloth-2x4", "/peer/trl:/peer"),
        ("sftop", []),
        ("sftop-at-unsloth-8x1-peak", ["plan.max_memory_gib=3.21"]),
        ("sftop-at-unsloth-8x1-peak+0.6", ["plan.max_memory_gib=3.81"]),
    ]
    report = json.loads((out / "whole_run.json").read_text())
    assert report["sftop"]["x_unsloth_8x1"] == pytest.approx(4.1)
    assert report["unsloth-2x4"]["x_unsloth_8x1"] == pytest.approx(0.5)
    planner, capped, with_context = report["targets_vs_unsloth_8x1"]
    assert (planner["row"], planner["met"], planner["target"]) == ("sftop", True, 4.0)
    assert capped == {
        "row": "sftop:at-unsloth-8x1-peak",
        "what": "plan.max_memory_gib = unsloth-8x1's peak",
        "cap_gib": 3.21,
        "peak_gib": 3.4,
        "ratio": pytest.approx(1.5),
        "target": 2.0,
        "met": False,
        "within_cap": False,
    }
    assert with_context["what"] == "plan.max_memory_gib = unsloth-8x1's peak + 0.60 GiB"
    assert (with_context["cap_gib"], with_context["within_cap"], with_context["met"]) == (3.81, True, False)
    md = (out / "whole_run.md").read_text()
    assert "| path | useful tokens/s | x Unsloth 8x1 | train time s |" in md
    assert (
        "| unsloth-2x4 | 5,000 | 0.50x | 1.9 | 30.0 | 3.21 | 3 | 8.0 | Unsloth 2026.10.9 batch 2 x 4, padding-free,"
        in md
    )
    assert "| sftop | 41,000 | 4.10x |" in md
    assert "sftop (planner's choice) / Unsloth batch 8 x 1 useful tokens/s: 4.10x, target at least 4x: met." in md
    assert (
        "sftop:at-unsloth-8x1-peak (plan.max_memory_gib = unsloth-8x1's peak) / Unsloth batch 8 x 1 useful "
        "tokens/s: 1.50x, target at least 2x: MISSED; cap 3.21 GiB, sftop's peak 3.40 GiB (OVER the cap)."
    ) in md
    assert {_cells(line) for line in md.splitlines() if line.startswith("| ")} == {9}


@NO_UNSLOTH
def test_step_bench_unsloth_path_says_why_and_the_others_run(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "step_bench.py"),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--paths",
            "unsloth,stock",
            "--batch",
            "1",
            "--seq",
            "16",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"unsloth     not measured: Unsloth cannot be imported here ({MISSING})" in run.stdout
    unsloth, stock = json.loads(out.read_text())["results"]
    assert unsloth == {"path": "unsloth", "unavailable": MISSING}
    assert stock["path"] == "stock" and stock["tokens_per_s"] > 0 and "speed_vs_unsloth" not in stock


def test_step_bench_refuses_unknown_paths(capsys):
    with pytest.raises(SystemExit) as exc:
        step_bench.main(["--paths", "stock,liger"])
    assert exc.value.code == 2 and "unknown path(s) liger" in capsys.readouterr().err


def test_step_bench_ratios_against_unsloth():
    results = [
        {"path": "unsloth", "tokens_per_s": 50_000.0, "peak_gib": 3.5},
        {"path": "sftop", "tokens_per_s": 60_000.0, "peak_gib": 3.25},
        {"path": "stock", "error": "x"},
    ]
    step_bench.compare_with_unsloth(results)
    assert results[1]["speed_vs_unsloth"] == pytest.approx(1.2)
    assert results[1]["peak_minus_unsloth_gib"] == pytest.approx(-0.25)
    assert "speed_vs_unsloth" not in results[2]
    unmeasured = [{"path": "unsloth", "unavailable": MISSING}, {"path": "sftop", "tokens_per_s": 1.0}]
    step_bench.compare_with_unsloth(unmeasured)
    assert "speed_vs_unsloth" not in unmeasured[1]


def test_saved_checkpoints_carry_what_unsloths_loaders_read():
    """Unsloth's loaders read a directory: the text checkpoint needs a tokenizer, the vision one a
    processor whose parts all load offline (its video part named for AutoProcessor)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text = step_bench.random_checkpoint("tiny", "cpu")
    vision = step_bench.random_checkpoint("qwen2.5-vl-tiny", "cpu", in_memory=True)
    try:
        assert len(AutoTokenizer.from_pretrained(text.name, local_files_only=True)) == 300
        image = Qwen2VLImageProcessorPil.from_pretrained(vision.name, local_files_only=True)
        assert (image.patch_size, image.merge_size) == (14, 2)
        assert (
            "<|image_pad|>" in PreTrainedTokenizerFast.from_pretrained(vision.name, local_files_only=True).get_vocab()
        )
        saved = json.loads((Path(vision.name) / "processor_config.json").read_text())
        assert saved["processor_class"] == "Qwen2_5_VLProcessor"
        assert saved["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
        assert saved["video_processor"]["patch_size"] == 14 and saved["video_processor"]["merge_size"] == 2
    finally:
        text.cleanup()
        vision.cleanup()


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="AutoProcessor's video part needs torchvision"
)
def test_vision_checkpoint_loads_through_autoprocessor():
    """What Unsloth's FastVisionModel calls first on the saved directory."""
    from transformers import AutoProcessor

    vision = step_bench.random_checkpoint("qwen2.5-vl-tiny", "cpu")
    try:
        processor = AutoProcessor.from_pretrained(vision.name, local_files_only=True)
        assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.image_token == "<|image_pad|>"
        assert hasattr(processor, "image_processor") and hasattr(processor, "video_processor")
    finally:
        vision.cleanup()


def test_weights_by_precision_tells_4bit_from_16bit_layers():
    import torch
    from bitsandbytes.nn import Linear4bit

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = Linear4bit(8, 8, bias=False)
            self.lora_A = torch.nn.Linear(8, 2, bias=False)  # adapters are not the model's weights

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([Block(), Block()])
    model.model.merger = torch.nn.Module()
    model.model.merger.mlp = torch.nn.ModuleList([torch.nn.Linear(8, 8).to(torch.bfloat16)])
    model.lm_head = torch.nn.Linear(8, 8)
    weights = step_bench.weights_by_precision(model)
    assert weights == {"4-bit": {"model.layers": 2}, "16-bit": {"model.merger.mlp": 1}, "float32": {"lm_head": 1}}
    assert (
        step_bench.weights_text(weights)
        == "16-bit: model.merger.mlp (1); 4-bit: model.layers (2); float32: lm_head (1)"
    )


def test_sftop_row_counts_a_retried_step_once_and_reports_the_plan_change(tmp_path):
    from sftop.engine.events import EventWriter

    with EventWriter(tmp_path / "events.jsonl") as writer:
        writer.write({"type": "run_started", "plan": {"micro_batch": 4, "grad_accum": 2}})
        for step in (1, 2, 3, 2, 3, 4):  # an OOM at step 4 went back to the checkpoint of step 1
            writer.write({"type": "step", "step": step, "loss": 1.0, "tokens_per_s": 100.0})
            if step == 3 and not writer.path.read_text().count('"plan_changed"'):
                writer.write({"type": "plan_changed", "step": 3, "reason": "out of memory", "old": {}, "new": {}})
    result = whole_run.read_sftop_events(tmp_path)
    assert (result["steps"], result["step_events"]) == (4, 6)
    assert result["plan_changes"] == ["step 3: out of memory"]
    assert "PLAN CHANGED step 3: out of memory" in whole_run._plan_text("sftop", result)


def test_a_capped_row_that_failed_gets_no_rate_and_no_target(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sftop.engine.events import EventWriter

    run_dir = tmp_path / "sftop-at-unsloth-8x1-peak+0.6"

    def failing_run(command, env=None):
        # three steps, then out of memory for good: a run that saw a fraction of the data
        run_dir.mkdir(parents=True)
        with EventWriter(run_dir / "events.jsonl") as writer:
            writer.write({"type": "run_started", "plan": {"micro_batch": 1, "grad_accum": 8, "max_memory_gib": 3.61}})
            for step in (1, 2, 3):
                writer.write({"type": "step", "step": step, "loss": 1.0, "tokens_per_s": 1200.0, "time": 10.0 + step})
            writer.write({"type": "run_failed", "step": 3, "reason": "does not fit even at micro-batch 1"})
        return SimpleNamespace(returncode=3)

    monkeypatch.setattr(whole_run.subprocess, "run", failing_run)
    row = whole_run.run_sftop(tmp_path / "preset.toml", run_dir, ["plan.max_memory_gib=3.61"], {}, tmp_path, 423_120)
    assert row["failed"] == "does not fit even at micro-batch 1" and "useful_tokens_per_s" not in row
    assert not whole_run.finished_whole(row, 3) and whole_run.finished_whole({}, 0)
    report = {
        "unsloth-8x1": {"useful_tokens_per_s": 8339.0, "peak_allocated_gib": 3.01},
        "peer_rows": ["unsloth-8x1"],
        "sftop_rows": [run_dir.name.replace("sftop-", "sftop:", 1)],
        run_dir.name.replace("sftop-", "sftop:", 1): row,
    }
    whole_run.compare_with_peer(report)
    assert report["targets_vs_unsloth_8x1"] == []  # no "met" for a run that did not finish
