"""A vision-language run end to end on the CPU: checked rows, exact lengths, training, resume, export."""

import json

import pytest
import torch

from sftop.engine.events import read_events
from sftop.engine.rundir import RunDir
from sftop.engine.train.runner import run_training
from train_helpers import in_home, of_type
from vlm_helpers import vlm_preset, write_colour_dataset


@pytest.fixture(scope="module")
def vlm_run(sftop_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm-data")
    # row 3's image is missing, row 5's corrupt; row 7 is far longer than data.max_length with its image
    source = write_colour_dataset(folder, rows=24, bad={3: "missing", 5: "corrupt"})
    lines = source.read_text().splitlines()
    long_row = json.loads(lines[7])
    long_row["messages"][0]["content"][1]["text"] = "What colour is the shape? " * 30
    lines[7] = json.dumps(long_row)
    source.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path_factory.mktemp("vlm-run")
    mp = in_home(sftop_home)
    try:
        preset = vlm_preset(source, data={"max_bad_fraction": 0.2})
        code = run_training(preset, run_dir)
    finally:
        mp.undo()
    return code, run_dir, preset, source


def _events(run_dir):
    return read_events(run_dir / "events.jsonl")[0]


def test_vlm_run_trains_and_saves_adapter_with_processor(vlm_run):
    code, run_dir, _, _ = vlm_run
    records = _events(run_dir)
    assert code == 0, records[-1]
    assert [s["step"] for s in of_type(records, "step")] == [1, 2, 3, 4]
    adapter = RunDir(run_dir).adapter
    assert (adapter / "adapter_config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    # LoRA by part: the family's default, the language model's attention and MLP only
    # (PEFT stores the shortest suffixes that pick exactly the adapted layers: here no vision layer)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # the processor travels with the adapter: tokenizer, chat template, image processor
    names = {p.name for p in adapter.iterdir()}
    assert "tokenizer.json" in names and any("processor" in n for n in names), names


def test_vlm_run_started_reports_images_packing_and_kernels(vlm_run):
    _, run_dir, _, _ = vlm_run
    started = of_type(_events(run_dir), "run_started")[0]
    env = started["environment"]
    # Qwen2-VL packs its micro-batches (tests/train/test_vlm_packed_run.py checks the losses)
    assert env["packing"] is True and "padding-free" in env["packing_reason"]
    assert env["model"]["vision_family"] == "qwen2_vl"
    assert started["kernels"]["enabled"] is False and started["kernels"]["reason"] == "train.kernels = off"
    data = started["data"]
    # rows 3 and 5 (bad images) and 7 (too long with its image tokens) were skipped and counted
    assert data["rows_read"] == 24 and data["rows_skipped"] == 3
    reasons = {p["index"]: p["reason"] for p in data["problems"]}
    assert set(reasons) == {3, 5, 7}
    assert "longer than data.max_length" in reasons[7] and "image" in reasons[7]
    images = data["images"]
    # 56x56 images snap to 56x56: 2x2 merged blocks -> 4 <|image_pad|> + start/end markers
    assert images["images"] == 21 and images["image_tokens_max_per_row"] == 6
    assert 0 < images["image_token_share"] < 1
    assert started["preset"]["data"]["packing"] is True
    assert any("image tokens per micro-batch" in n for n in started["plan"]["notes"])


def test_vlm_resume_continues_from_checkpoint(vlm_run, sftop_home, tmp_path):
    _, run_dir, preset, _ = vlm_run
    mp = in_home(sftop_home)
    try:
        code = run_training(
            preset.model_copy(update={"train": preset.train.model_copy(update={"max_steps": 6})}), run_dir, resume=True
        )
    finally:
        mp.undo()
    records = _events(run_dir)
    assert code == 0, records[-1]
    started = of_type(records, "run_started")[-1]
    assert started["resumed_from_step"] == 4
    assert [s["step"] for s in of_type(records, "step")][-2:] == [5, 6]


def test_merged_vlm_export_matches_base_plus_adapter(vlm_run, sftop_home, home, tmp_path):
    from PIL import Image
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from sftop.engine.export import export_run
    from sftop.engine.models.demo_vlm import demo_family, demo_vlm_dir

    _, run_dir, _, source = vlm_run
    mp = in_home(sftop_home)
    try:
        adapter_out = export_run(RunDir(run_dir), out=tmp_path / "adapter")
        merged_out = export_run(RunDir(run_dir), merged=True, out=tmp_path / "merged")
    finally:
        mp.undo()
    assert (adapter_out / "adapter_model.safetensors").is_file() and (adapter_out / "tokenizer.json").is_file()
    assert not list(merged_out.glob("adapter_*")) and (merged_out / "tokenizer.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(merged_out).eval()
    base = AutoModelForImageTextToText.from_pretrained(demo_vlm_dir())
    with_adapter = PeftModel.from_pretrained(base, str(RunDir(run_dir).adapter)).eval()
    # the saved processor's tokenizer is the one the run trained with
    processor = demo_family().offline_processor()
    assert AutoTokenizer.from_pretrained(merged_out).get_vocab() == processor.tokenizer.get_vocab()
    image = Image.open(source.parent / "img" / "0.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        a = merged(**inputs).logits.float()
        b = with_adapter(**inputs).logits.float()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with with_adapter.disable_adapter(), torch.no_grad():
        plain = with_adapter(**inputs).logits.float()
    assert (a - plain).abs().max() > 1e-3  # the adapter changed the model: the comparison means something
    out = merged.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 or out[0, -1] == processor.tokenizer.eos_token_id
