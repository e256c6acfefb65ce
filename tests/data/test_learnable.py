"""The demo's promise: the default demo run learns single-digit sums it never saw.

It trains the real `demo` preset through the real trainer on the CPU (as `sftop run demo` does),
with every held-out sum as a sample prompt, and reads the model's greedy answers from the run's
last `samples` event: at least 90% must be exactly right.
"""

import json

import pytest

from sftop.engine.data.builtin import held_out_sum_prompts
from sftop.engine.presets import load_preset


@pytest.mark.slow
def test_demo_answers_at_least_90_percent_of_held_out_sums(tmp_path, monkeypatch):
    from sftop.engine.train.runner import run_training

    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "home"))
    held = held_out_sum_prompts()
    preset, _ = load_preset("demo")
    preset.train.sample_prompts = [q for q, _ in held]
    assert run_training(preset, tmp_path / "run") == 0

    records = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    samples = [r for r in records if r["type"] == "samples"]
    interval = preset.train.eval_steps or preset.train.save_steps
    assert [s["step"] for s in samples] == list(range(interval, preset.train.max_steps + 1, interval))
    last = {s["prompt"]: s["answer"] for s in samples[-1]["samples"]}
    right = [q for q, answer in held if last[q] == answer]
    wrong = {q: last[q] for q, answer in held if last[q] != answer}
    print(f"held-out sums right: {len(right)}/{len(held)}; wrong: {wrong}")
    assert len(right) >= 0.9 * len(held), wrong
    # the first samples come before the model has learned: the pane shows learning, not a constant
    first = {s["prompt"]: s["answer"] for s in samples[0]["samples"]}
    assert sum(first[q] == a for q, a in held) < len(right)
