"""`sftop run demo-vision`: the tiny VLM learns from builtin:shapes on a CPU, and answers questions
about pictures it has never seen well above chance (greedy generation on held-out pictures)."""

import collections

import pytest
import torch

from sftop.engine.presets import load_preset
from sftop.engine.train.runner import run_training
from train_helpers import events_of, in_home, of_type

# Uniform guessing among each kind's answers (colour 1/4, shape 1/3, count 1/4, position 1/4,
# compare 1/2, colour of an image 1/4), weighted by the held-out set's kinds: about 0.29.
CHANCE = {
    "colour": 1 / 4,
    "shape": 1 / 3,
    "count": 1 / 4,
    "position": 1 / 4,
    "compare": 1 / 2,
    "colour_of_image": 1 / 4,
}
HELD_OUT = 200


@pytest.fixture(scope="module")
def demo_vision_run(sftop_home, tmp_path_factory):
    mp = in_home(sftop_home)
    try:
        preset, _ = load_preset("demo-vision", ['train.kernels="off"'])  # as shipped (CPU: stock layers anyway)
        run_dir = tmp_path_factory.mktemp("demo-vision")
        code = run_training(preset, run_dir)
    finally:
        mp.undo()
    return code, run_dir


def _answers(run_dir, rows):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from sftop.engine.data.images import resize_to_budget
    from sftop.engine.data.shapes import row_pictures
    from sftop.engine.models.demo_vlm import demo_family, demo_vlm_dir

    family = demo_family()
    processor = family.offline_processor()
    base = AutoModelForImageTextToText.from_pretrained(demo_vlm_dir())
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    answers = []
    for row in rows:
        images = [resize_to_budget(image, family.image_rules) for image in row_pictures(row)]
        text = processor.apply_chat_template([row["messages"][0]], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers.append(
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return answers


@pytest.mark.slow
def test_demo_vision_loss_halves_and_answers_held_out_pictures(demo_vision_run, home):
    from sftop.engine.data.shapes import shapes_heldout

    code, run_dir = demo_vision_run
    records = events_of(run_dir)
    assert code == 0, records[-1]
    steps = of_type(records, "step")
    first, last = steps[0]["loss"], sum(s["loss"] for s in steps[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    rows = shapes_heldout(HELD_OUT)
    answers = _answers(run_dir, rows)
    hits, total = collections.Counter(), collections.Counter()
    for row, answer in zip(rows, answers):
        total[row["kind"]] += 1
        hits[row["kind"]] += answer == row["answer"]
    chance = sum(CHANCE[k] * n for k, n in total.items()) / len(rows)
    accuracy = sum(hits.values()) / len(rows)
    colour = hits["colour"] / total["colour"]
    print(
        f"held-out accuracy {accuracy:.3f} (chance {chance:.3f}); per kind "
        + ", ".join(f"{k} {hits[k]}/{total[k]}" for k in sorted(total))
    )
    assert chance == pytest.approx(0.29, abs=0.02)
    # measured 0.45 overall and 25/41 on colour (2026-12-06); chance is 0.29 and 0.25
    assert accuracy >= 0.38, (accuracy, dict(hits), dict(total))
    assert colour >= 0.40, (colour, dict(hits), dict(total))
