"""The product's main job: the demo preset trains offline on CPU, loss falls, the adapter works."""

import re

import pytest
import torch

from sftop.engine.events import SCHEMA_VERSION
from sftop.engine.presets import load_preset
from sftop.engine.train.runner import run_training

from train_helpers import events_of, in_home, of_type

STEP_FIELDS = {
    "step": int,
    "epoch": float,
    "loss": float,
    "learning_rate": float,
    "grad_norm": float,
    "tokens_seen": int,
    "tokens_per_s": float,
    "samples_per_s": float,
}


@pytest.fixture(scope="module")
def demo_run(sftop_home, tmp_path_factory):
    """The demo preset as shipped, shortened to 24 steps to keep CI fast."""
    mp = in_home(sftop_home)
    mp.setenv("HF_TOKEN", "hf_sftop_test_secret_do_not_write")
    try:
        preset, _ = load_preset("demo", ["train.max_steps=24", "train.save_steps=12", 'train.kernels="off"'])
        run_dir = tmp_path_factory.mktemp("demo-run")
        code = run_training(preset, run_dir)
    finally:
        mp.undo()
    return code, run_dir


def test_demo_run_finishes_with_falling_loss(demo_run):
    code, run_dir = demo_run
    records = events_of(run_dir)
    assert code == 0, records[-1]
    steps = of_type(records, "step")
    assert [s["step"] for s in steps] == list(range(1, 25))
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert first > 5.0  # random init over a 512-token vocabulary
    assert last < 0.5 * first, (first, last)
    assert records[-1]["type"] == "run_finished"
    assert records[-1]["step"] == 24
    assert records[-1]["final_loss"] == pytest.approx(last)


def test_demo_events_follow_schema(demo_run):
    _, run_dir = demo_run
    records = events_of(run_dir)
    for record in records:
        assert record["v"] == SCHEMA_VERSION
        assert isinstance(record["time"], float)
    started = of_type(records, "run_started")
    assert len(started) == 1
    s = started[0]
    assert s["total_steps"] == 24 and s["resumed_from_step"] is None
    assert s["preset"]["plan"]["micro_batch"] * s["preset"]["plan"]["grad_accum"] == 16
    for key in ("python", "torch", "transformers", "trl", "peft", "device", "dtype"):
        assert s["environment"][key], key
    assert s["environment"]["dtype"] == "fp32" and s["environment"]["device"] == "cpu"
    assert s["data"]["format"] == "messages"
    assert s["plan"]["micro_batch"] == s["preset"]["plan"]["micro_batch"]
    steps = of_type(records, "step")
    seen = 0
    for step in steps:
        for key, kind in STEP_FIELDS.items():
            assert isinstance(step[key], (int, float) if kind is float else kind), (key, step[key])
        assert step["total_steps"] == 24
        assert step["tokens_seen"] > seen  # non-padding tokens, counted from the batches
        assert step["tokens_per_s"] > 0 and step["samples_per_s"] > 0
        assert step["gpu_mem_allocated_gib"] is None  # CPU run
        seen = step["tokens_seen"]
    # 5% warmup of 24 steps = 2 steps up to the peak, then linear decay
    assert max(s["learning_rate"] for s in steps) == pytest.approx(3e-3)
    assert steps[-1]["learning_rate"] < 3e-4
    checkpoints = of_type(records, "checkpoint")
    assert [c["step"] for c in checkpoints] == [12, 24]
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["checkpoint-12", "checkpoint-24"]
    # the demo's sample prompts are answered after the last step (eval_steps 25 > 24 steps)
    samples = of_type(records, "samples")
    assert [x["step"] for x in samples] == [24]
    assert [x["prompt"] for x in samples[0]["samples"]] == s["preset"]["train"]["sample_prompts"]
    assert all(isinstance(x["answer"], str) for x in samples[0]["samples"])


def test_resolved_preset_repeats_the_run(demo_run):
    _, run_dir = demo_run
    preset, _ = load_preset(run_dir / "preset.toml")
    assert isinstance(preset.plan.micro_batch, int) and isinstance(preset.plan.grad_accum, int)
    assert preset.plan.gradient_checkpointing in ("off", "on", "offload")
    assert preset.model.dtype == "fp32" and preset.model.attn_implementation == "sdpa"
    assert preset.train.max_steps == 24


def test_no_secret_written_anywhere(demo_run):
    _, run_dir = demo_run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"hf_sftop_test_secret" not in path.read_bytes(), path


def test_adapter_loads_and_answers_with_a_number(demo_run, home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftop.engine.models.demo import demo_dir

    _, run_dir = demo_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(demo_dir())
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()

    def answers():
        out = []
        for question in ("What is 3+4?", "What is 9-2?", "What is 6+7?"):
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :]))
        return out

    looks_right = re.compile(r"\d{1,3}<\|im_end\|>.*", flags=re.S)
    trained = answers()
    assert all(looks_right.fullmatch(a) for a in trained), trained
    with model.disable_adapter():  # the random-init base alone does not answer like the data
        untrained = answers()
    assert not any(looks_right.fullmatch(a) for a in untrained), untrained
