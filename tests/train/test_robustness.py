"""NaN/inf updates are skipped and end the run after max_bad_steps; the disk check stops a run early."""

import pytest
import torch
from safetensors.torch import load_file

from sftop.engine.errors import ResourceError
from sftop.engine.events import EventWriter
from sftop.engine.rundir import RunDir
from sftop.engine.train import resources
from sftop.engine.train.runner import _Run, run_training
from train_helpers import events_of, fast_preset, of_type


def test_nan_steps_are_skipped_then_the_run_fails(home, tmp_path):
    preset = fast_preset(
        "train.max_steps=20", "train.save_steps=2", "train.max_bad_steps=3", "train.save_total_limit=5"
    )
    run_dir = RunDir(tmp_path / "run").create()
    with EventWriter(run_dir.events) as writer:
        run = _Run(preset, run_dir, writer, resume=False)
        run.resolve()
        run.load()
        # Test-only fault injection: from the 5th training forward on, the final norm outputs NaN.
        calls = {"n": 0}

        def poison(module, args, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] > 4 else output

        run.model.get_base_model().model.norm.register_forward_hook(poison)
        code = run.train()
        lora_now = {k: v.detach().clone() for k, v in run.model.named_parameters() if v.requires_grad}
        optimizer_steps = {id(p): s.get("step") for p, s in run.trainer.optimizer.optimizer.state.items()}

    assert code == 4
    records = events_of(run_dir.path)
    bad = of_type(records, "bad_step")
    assert [(b["step"], b["consecutive"]) for b in bad] == [(5, 1), (6, 2), (7, 3)]
    steps = of_type(records, "step")
    assert [s["step"] for s in steps] == list(range(1, 8))
    assert all(s["loss"] is None and s["grad_norm"] is None for s in steps[4:])
    assert all(s["loss"] is not None for s in steps[:4])
    failed = records[-1]
    assert failed["type"] == "run_failed" and failed["step"] == 7
    assert "NaN" in failed["reason"] and "max_bad_steps = 3" in failed["reason"]
    # The last good checkpoint stays the newest: nothing was saved during the bad streak.
    assert [p.name for p in run_dir.complete_checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert failed["checkpoint"].endswith("checkpoint-4")
    # Skipped updates left the adapter exactly as it was after step 4, and Adam saw only 4 steps.
    saved = load_file(run_dir.checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert len(saved) == len(lora_now)
    for name, value in lora_now.items():
        key = name.replace(".default", "")
        assert torch.equal(saved[key], value), name
    assert set(int(s) for s in optimizer_steps.values()) == {4}
    assert all(torch.isfinite(v).all() for v in lora_now.values())


def _free(monkeypatch, gib):
    class Usage:
        total, used, free = 2 * gib * 2**30, gib * 2**30, int(gib * 2**30)

    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: Usage)


def test_disk_check_names_the_numbers(monkeypatch, tmp_path):
    needs = resources.expected_disk_bytes(
        trainable_params=1_000_000_000, total_params=8_000_000_000, save_total_limit=2
    )
    # adapter fp32 + two Adam moments, for 2 kept checkpoints + the one being written
    assert needs == {"checkpoints": 36_000_000_000, "final adapter": 4_000_000_000, "merged export": 16_000_000_000}
    _free(monkeypatch, 10)
    with pytest.raises(ResourceError) as info:
        resources.check_disk_space(tmp_path / "not-yet" / "run", needs)
    text = str(info.value)
    assert "57.37 GiB needed" in text  # 56e9 bytes + 10%
    assert "checkpoints 33.53 GiB" in text and "merged export 14.90 GiB" in text
    assert "10.00 GiB free" in text
    assert str(tmp_path) in text  # the existing parent that was measured
    _free(monkeypatch, 60)
    assert resources.check_disk_space(tmp_path, needs) == 60 * 2**30


def test_run_stops_before_training_when_the_disk_is_too_small(home, tmp_path, monkeypatch):
    _free(monkeypatch, 1 / 1024)  # 1 MiB
    run_dir = tmp_path / "run"
    code = run_training(fast_preset("train.max_steps=3"), run_dir)
    assert code == ResourceError.exit_code
    records = events_of(run_dir)
    assert records[-1]["type"] == "run_failed"
    reason = records[-1]["reason"]
    assert "Not enough free disk space" in reason and "0.00 GiB free" in reason
    assert "GiB needed" in reason and "checkpoints" in reason and "merged export" in reason
    assert not of_type(records, "step")
    assert (run_dir / "preset.toml").is_file()  # written before anything heavy, so the run can be repeated


def test_held_out_rows_are_evaluated_at_each_checkpoint(home, tmp_path):
    # the demo preset evaluates every 25 steps (for its samples pane); here at each checkpoint
    code = run_training(
        fast_preset("train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "data.eval_fraction=0.02"),
        tmp_path / "run",
    )
    assert code == 0
    records = events_of(tmp_path / "run")
    evals = of_type(records, "eval")
    assert [e["step"] for e in evals] == [2, 4]
    assert all(isinstance(e["eval_loss"], float) and 0 < e["eval_loss"] < 10 for e in evals)
    assert "eval_runtime" in evals[0]["metrics"]
    assert of_type(records, "run_started")[0]["data"]["eval_rows"] == 20


def test_model_error_ends_the_run_with_a_reason(home, tmp_path):
    code = run_training(fast_preset('model.name="sftop-test-org/not-cached"'), tmp_path / "run")
    assert code == 2
    records = events_of(tmp_path / "run")
    assert [r["type"] for r in records] == ["run_failed"]
    assert "hf download sftop-test-org/not-cached" in records[0]["reason"]
    assert records[0]["step"] is None and records[0]["checkpoint"] is None
    assert (tmp_path / "run" / "preset.toml").is_file()  # listed by `sftop runs`, repeatable after the fix
