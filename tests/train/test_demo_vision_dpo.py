"""The demo-vision-dpo preset, as shipped but for its length: DPO on pictures (the Hugging Face VLM
course's preference workflow) from a demo-vision run's adapter, offline on a CPU, through sftop's
run path: pairs with their images checked and collated, the earlier adapter frozen as the
reference, rewards and preference accuracy in every step event."""

import pytest

from sftop.engine.data.builtin import load_builtin
from sftop.engine.presets import load_preset
from sftop.engine.rundir import new_run_dir
from sftop.engine.train.runner import run_training

from train_helpers import events_of, in_home, of_type

pytestmark = pytest.mark.slow

STEPS = 3


def test_demo_vision_dpo_runs_from_the_demo_vision_adapter(sftop_home):
    mp = in_home(sftop_home)
    try:
        # a two-step SFT run stands in for `sftop run demo-vision`: DPO needs an adapter to start from
        sft, _ = load_preset("demo-vision", ["train.max_steps=2", "train.save_steps=2", 'train.kernels="off"'])
        sft_dir = new_run_dir("demo-vision")
        assert run_training(sft, sft_dir) == 0
        preset, _ = load_preset("demo-vision-dpo", [f"train.max_steps={STEPS}", "data.max_rows=16"])
        run_dir = new_run_dir("demo-vision-dpo")
        code = run_training(preset, run_dir)
    finally:
        mp.undo()
    records = events_of(run_dir.path)
    assert code == 0, records[-1]
    started = of_type(records, "run_started")[0]
    assert started["preset"]["model"]["adapter"] == "latest:demo-vision"
    assert started["data"]["task"] == "dpo" and started["data"]["rows"] == 16
    pictures = sum(len(row["images"]) for row in load_builtin("builtin:shapes-preferences")[:16])
    assert started["data"]["images"]["images"] == pictures > 0
    assert started["kernels"]["reference"] == "ref adapter"  # the SFT adapter as it was, frozen
    steps = of_type(records, "step")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # policy == reference at the start: log 2, no margin
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and steps[0]["reward_margin"] == 0.0
    for s in steps:
        assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(s)
        assert s["reward_margin"] == pytest.approx(s["reward_chosen"] - s["reward_rejected"], abs=1e-5)
    assert steps[-1]["reward_margin"] != 0.0  # the policy moved off the reference
    assert records[-1]["type"] == "run_finished" and (run_dir.path / "adapter" / "adapter_config.json").is_file()
