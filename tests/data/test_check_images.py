"""`sftop data check` on image datasets: statistics, image tokens, bad rows, the sample."""

import json

import pytest
from data_tokenizers import make_tokenizer
from image_fixtures import encoded, truncated, noise, write
from PIL import Image

from sftop.engine.data.check import check_data, render_check
from sftop.engine.data.images import ImageRules
from sftop.engine.presets.schema import Preset

RULES = ImageRules(patch_multiple=28, min_edge=28, max_pixels=112 * 112, min_pixels=56 * 56, max_aspect_ratio=200.0)


def tokens_per_patch(width, height):
    return (width // 28) * (height // 28) + 2  # patches plus begin/end markers


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("char", "chatml")


def dataset(tmp_path):
    write(tmp_path / "img" / "big.png", encoded(Image.new("RGB", (448, 224), (200, 10, 10))))
    write(tmp_path / "img" / "small.png", encoded(Image.new("RGB", (56, 56), (10, 10, 200))))
    write(tmp_path / "img" / "cut.jpg", truncated(noise(96, 96), "JPEG"))
    rows = [
        {"prompt": "Colour?", "completion": "red", "images": ["img/big.png"]},
        {
            "prompt": "<image> vs <image>: which is blue?",
            "completion": "second",
            "images": ["img/big.png", "img/small.png"],
        },
        {"prompt": "Colour?", "completion": "blue", "images": ["img/cut.jpg"]},
        {"prompt": "<image> and <image>", "completion": "x", "images": ["img/small.png"]},
        {"prompt": "No picture here", "completion": "fine", "images": []},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_statistics_and_exact_token_share(tmp_path, tok):
    preset = Preset(data={"source": str(dataset(tmp_path)), "max_bad_fraction": 0.5, "max_length": 256})
    result = check_data(preset, tok, image_rules=RULES, image_tokens=tokens_per_patch)
    assert [(p.index, p.reason.split(":")[0]) for p in result.problems] == [
        (2, "image 1"),
        (3, "image placeholders do not match the images"),
    ]
    assert result.problems[0].reason == "image 1: file img/cut.jpg is truncated (the file ends before the image does)"
    s = result.image_stats
    assert s.images_per_row == {0: 1, 1: 1, 2: 1} and s.images == 3 and s.rows_with_images == 2
    assert s.original.width == (56, 448, 448) and s.final.width == (56, 140, 140)
    # 448x224 scaled to the budget is 158.4x79.2; rounded (168x84) it is over the budget, so both sides
    # round down, as Qwen's processor does: 140x56
    assert s.final.height == (56, 56, 56) and s.resized == 2
    assert s.tokens_per_image == (6, 12, 12) and s.image_tokens == 12 + 12 + 6
    assert s.image_token_share == pytest.approx(30 / (30 + s.text_tokens))
    # lengths count the image tokens (what the model sees)
    assert result.stats.tokens == s.text_tokens + 30
    text = render_check(result)
    assert "images    3 in 2 of 3 usable rows" in text
    assert "   1 per row        1  ████████████████████" in text
    assert "before: width 56–448 (median 448), height 56–224 (median 224)" in text
    assert "after:  width 56–140 (median 140), height 56  (2 resized)" in text
    assert "budget    3,136–12,544 pixels, sides in steps of 28 (the model's rules" in text
    assert f"6–12 (median 12) per image; {s.image_token_share:.1%} of all tokens are image tokens" in text
    assert "row 2: image 1: file img/cut.jpg is truncated" in text
    # the sample is the first usable row with images, each image shown where it sits
    assert result.sample_index == 0 and [im.size for im in result.sample_images] == [(140, 56)]
    assert "[image 1: 448x224 -> 140x56]\nColour?" in "".join(t for t, _ in result.sample_spans)
    assert "«red<|im_end|>»" in text
    data = result.to_dict()
    json.dumps(data)
    assert data["images"]["tokens_per_image"] == [6, 12, 12]
    assert data["sample_images"] == [{"before": [448, 224], "after": [140, 56]}]


def test_without_a_vision_model_the_count_is_left_open(tmp_path, tok):
    result = check_data(Preset(data={"source": str(dataset(tmp_path)), "max_bad_fraction": 0.5}), tok)
    assert result.image_stats.tokens_per_image is None and not result.image_tokens_counted
    text = render_check(result)
    assert "tokens per image and their share: needs a vision model to count" in text
    assert "generic rules: no vision model given" in text


def test_rows_too_long_with_their_images_are_dropped_not_truncated(tmp_path, tok):
    preset = Preset(data={"source": str(dataset(tmp_path)), "max_bad_fraction": 0.9, "max_length": 80})
    plain = check_data(preset, tok, image_rules=RULES)  # without counts the text alone fits
    assert {p.index for p in plain.problems} == {2, 3}
    result = check_data(preset, tok, image_rules=RULES, image_tokens=lambda w, h: 60)
    reasons = {p.index: p.reason for p in result.problems}
    assert set(reasons) == {0, 1, 2, 3}
    assert reasons[1].endswith("(120 image tokens), longer than data.max_length = 80")
    assert result.usable_rows == 1 and result.stats.length_max <= 80


def test_text_model_verdict(tmp_path, tok):
    result = check_data(Preset(data={"source": str(dataset(tmp_path))}), tok, allow_images=False)
    assert result.image_stats is None and result.would_stop
    assert result.problems[0].reason == "message 0 holds an image, and this model reads text only"


def test_budget_keys_reach_the_check(tmp_path, tok):
    preset = Preset(
        data={"source": str(dataset(tmp_path)), "max_bad_fraction": 0.5, "max_pixels": 56 * 56, "min_pixels": 28 * 28}
    )
    result = check_data(preset, tok, image_rules=RULES)
    assert result.image_stats.final.pixels[2] <= 56 * 56 and result.image_stats.rules.min_pixels == 28 * 28


def test_cli_json(tmp_path, capsys, monkeypatch):
    from sftop import cli

    rows_path = dataset(tmp_path)
    monkeypatch.setattr("sftop.engine.models.tokenizer.load_tokenizer", lambda model: make_tokenizer("char", "chatml"))
    code = cli.main(
        ["data", "check", "demo", "--set", f"data.source={rows_path}", "--set", "data.max_bad_fraction=0.5", "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["images"]["images"] == 3 and out["bad_rows"] == 2
