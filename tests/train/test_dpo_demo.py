"""The demo-dpo preset, as shipped, starting from a demo SFT run's adapter: offline on a CPU, the
preference accuracy rises well above 0.5 and the chosen reward rises above the rejected one."""

import pytest

from sftop.engine.presets import load_preset
from sftop.engine.rundir import new_run_dir
from sftop.engine.train.runner import run_training

from train_helpers import events_of, in_home, of_type

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(sftop_home):
    mp = in_home(sftop_home)
    try:
        # a short SFT run stands in for `sftop run demo`: DPO only needs an adapter to start from
        sft, _ = load_preset("demo", ["train.max_steps=16", "train.save_steps=16", 'train.kernels="off"'])
        sft_dir = new_run_dir("demo")
        assert run_training(sft, sft_dir) == 0
        preset, _ = load_preset("demo-dpo", [])
        run_dir = new_run_dir("demo-dpo")
        code = run_training(preset, run_dir)
    finally:
        mp.undo()
    return code, run_dir, sft_dir


def test_demo_dpo_learns_the_preferences(dpo_run):
    code, run_dir, sft_dir = dpo_run
    records = events_of(run_dir.path)
    assert code == 0, records[-1]
    started = of_type(records, "run_started")[0]
    assert started["preset"]["train"]["task"] == "dpo"
    assert started["preset"]["model"]["adapter"] == "latest:demo"
    # the reference is the SFT adapter as it was: a frozen copy, not the bare base model
    assert started["kernels"]["reference"] == "ref adapter"
    assert started["data"]["task"] == "dpo" and started["data"]["rows"] == 16
    steps = of_type(records, "step")
    assert len(steps) == started["total_steps"] == 24
    assert steps[0]["reward_accuracy"] == 0.0 and steps[0]["reward_margin"] == 0.0  # policy == reference
    last = steps[-8:]
    accuracy = sum(s["reward_accuracy"] for s in last) / len(last)
    chosen = sum(s["reward_chosen"] for s in last) / len(last)
    rejected = sum(s["reward_rejected"] for s in last) / len(last)
    assert accuracy >= 0.75, [s["reward_accuracy"] for s in steps]
    assert chosen > rejected and all(s["reward_margin"] > 0 for s in last[-3:]), (chosen, rejected)
    assert sum(s["loss"] for s in last) / len(last) < 0.6931 - 0.1  # below log 2, where it starts
    finished = records[-1]
    assert finished["type"] == "run_finished" and (run_dir.path / "adapter" / "adapter_config.json").is_file()
    assert not (run_dir.path / "adapter" / "ref").exists()  # the frozen reference is not the result


def test_demo_dpo_without_an_sft_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path))
    from sftop.engine.errors import ModelError
    from sftop.engine.models.adapters import resolve_adapter

    with pytest.raises(ModelError) as exc:
        resolve_adapter("latest:demo")
    assert "No run of preset `demo`" in str(exc.value) and "sftop run demo" in exc.value.hint
