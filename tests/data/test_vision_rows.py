"""Image datasets in every layout users bring, normalised to conversations with images in place."""

import csv
import json

import pytest
from image_fixtures import corrupt_png, encoded, noise, truncated, write
from PIL import Image

from sftop.engine.data.conversation import ImagePart, TextPart
from sftop.engine.data.formats import RowError
from sftop.engine.data.image_check import (
    ImageStats,
    check_rows_images,
    check_structured_images,
    load_row_images,
    resolve_row_images,
)
from sftop.engine.data.images import ImageRules
from sftop.engine.data.prepare import validate_structure
from sftop.engine.data.sources import RawRows
from sftop.engine.data.validate import validate_rows
from sftop.engine.data.vision_rows import attach_images, normalise_image_row
from sftop.engine.presets.schema import DataSection

RULES = ImageRules(
    patch_multiple=14, min_edge=14, max_pixels=64 * 14 * 14, min_pixels=4 * 14 * 14, max_aspect_ratio=20.0
)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(colour, size=(56, 42)) -> bytes:
    return encoded(Image.new("RGB", size, colour))


def colour_name(pixel) -> str:
    """The flat colour an image was filled with (JPEG may shift it by a few levels)."""
    for name, ref in (("red", RED), ("green", GREEN), ("blue", BLUE)):
        if sum(abs(a - b) for a, b in zip(pixel, ref)) < 40:
            return name
    return f"?{pixel}"


def layout(conv):
    """The conversation as [(role, ["T:text" | "I:<colour of the image>"]), ...] after the image stage."""
    out = []
    for m in conv.messages:
        parts = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append("T:" + p.text)
            else:
                parts.append("I:" + colour_name(p.image.getpixel((2, 2))))
        out.append((m.role, parts))
    return out


def run(source, **data):
    """The structural pass and the image stage, as a run with a vision model does them."""
    structured = validate_structure(DataSection(source=str(source), **data), strict=False, allow_images=True)
    check = check_structured_images(structured, RULES, keep_images=True)
    return structured, check


def problems(structured):
    return {p.index: p.reason for p in structured.report.problems}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def folder_of_images(tmp_path):
    write(tmp_path / "photos" / "red.png", png(RED))
    write(tmp_path / "photos" / "green.jpg", encoded(Image.new("RGB", (70, 56), GREEN), "JPEG", quality=100))
    write(tmp_path / "photos" / "blue.png", png(BLUE))


# -- TRL layouts --------------------------------------------------------------------------------


def test_trl_images_column_with_placeholders_jsonl(tmp_path):
    folder_of_images(tmp_path)
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            ],
            "images": ["photos/red.png"],
        },
        # two images anywhere in the turn, and a second user turn with its own image
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "A"},
                        {"type": "image"},
                        {"type": "text", "text": "B"},
                        {"type": "image"},
                    ],
                },
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]},
                {"role": "assistant", "content": "blue"},
            ],
            "images": ["photos/red.png", "photos/green.jpg", "photos/blue.png"],
        },
    ]
    structured, check = run(write_jsonl(tmp_path / "d.jsonl", rows))
    assert structured.format == "messages" and not structured.report.problems
    assert layout(check.conversations[0]) == [("user", ["I:red", "T:Colour?"]), ("assistant", ["T:red"])]
    assert layout(check.conversations[1]) == [
        ("user", ["T:A", "I:red", "T:B", "I:green"]),
        ("assistant", ["T:ok"]),
        ("user", ["I:blue", "T:and this?"]),
        ("assistant", ["T:blue"]),
    ]
    assert check.sizes[1] == [((56, 42), (56, 42)), ((70, 56), (70, 56)), ((56, 42), (56, 42))]


def test_trl_single_image_column_and_string_content(tmp_path):
    folder_of_images(tmp_path)
    rows = [
        {
            "messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "green"}],
            "image": "photos/green.jpg",
        },
    ]
    structured, check = run(write_jsonl(tmp_path / "d.jsonl", rows))
    # string content: the images go before the first user turn's text, as TRL does
    assert layout(check.conversations[0]) == [("user", ["I:green", "T:What colour?"]), ("assistant", ["T:green"])]


def test_prompt_completion_with_images(tmp_path):
    folder_of_images(tmp_path)
    rows = [
        {"prompt": "Which colour?", "completion": "blue", "images": ["photos/blue.png"]},
        {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "Name it"}, {"type": "image"}]}],
            "completion": [{"role": "assistant", "content": "red"}],
            "images": ["photos/red.png"],
        },
    ]
    structured, check = run(write_jsonl(tmp_path / "d.jsonl", rows))
    assert structured.format == "prompt_completion" and not structured.report.problems
    assert layout(check.conversations[0]) == [("user", ["I:blue", "T:Which colour?"]), ("assistant", ["T:blue"])]
    assert layout(check.conversations[1]) == [("user", ["T:Name it", "I:red"]), ("assistant", ["T:red"])]


def test_llava_instruct_mix_shape(tmp_path):
    """Parts as `datasets` stores them: every part has every key (`text: None`, `index`)."""
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"index": None, "text": "Describe.", "type": "text"},
                    {"index": 0, "text": None, "type": "image"},
                ],
            },
            {"role": "assistant", "content": [{"index": None, "text": "A red square.", "type": "text"}]},
        ],
        "images": [{"bytes": png(RED), "path": None}],
    }
    raw = RawRows(source="mem", kind="hub", rows=[row])
    convs, report = validate_rows(raw, "messages", "assistant", allow_images=True)
    assert not report.problems
    check = check_rows_images(convs, None, RULES, report, keep_images=True)
    assert layout(check.conversations[0]) == [("user", ["T:Describe.", "I:red"]), ("assistant", ["T:A red square."])]


def test_inline_images_of_every_kind_and_a_system_turn(tmp_path):
    """The MMIU layout of TRL's guide: context in the system turn, several images, then the question."""
    folder_of_images(tmp_path)
    row = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You judge photos. Answer A, B, C or D."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.new("RGB", (56, 56), RED)},  # a PIL image
                    {"type": "image", "image": png(GREEN)},  # raw bytes
                    {"type": "image", "image": {"bytes": png(BLUE), "path": "b.png"}},  # datasets' Image storage
                    {"type": "image", "image": "photos/red.png"},  # a path relative to the data file
                    {"type": "text", "text": "Which is real?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ]
    }
    raw = RawRows(source=str(tmp_path / "d.jsonl"), kind="jsonl", rows=[row])
    convs, report = validate_rows(raw, "messages", "assistant", allow_images=True)
    check = check_rows_images(convs, tmp_path, RULES, report, keep_images=True)
    assert not report.problems
    assert layout(check.conversations[0]) == [
        ("system", ["T:You judge photos. Answer A, B, C or D."]),
        ("user", ["I:red", "I:green", "I:blue", "I:red", "T:Which is real?"]),
        ("assistant", ["T:A"]),
    ]


# -- LLaVA / ShareGPT markers -------------------------------------------------------------------


def test_llava_markers_sharegpt(tmp_path):
    folder_of_images(tmp_path)
    rows = [
        {
            "id": "1",
            "image": "photos/red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "2",
            "images": ["photos/red.png", "photos/blue.png"],
            "conversations": [
                {"from": "human", "value": "First <image> then"},
                {"from": "gpt", "value": "ok"},
                {"from": "human", "value": "<image>which?"},
                {"from": "gpt", "value": "blue"},
            ],
        },
    ]
    structured, check = run(write_jsonl(tmp_path / "d.jsonl", rows))
    assert structured.format == "sharegpt"
    # the `images` column wins over `image` when a file has both; row 0 has no `images`
    assert problems(structured) == {
        0: "image placeholders do not match the images: the text holds 1 `<image>` marker but the row has 0 images in `images`"
    }
    assert layout(check.conversations[0]) == [
        ("user", ["T:First ", "I:red", "T: then"]),
        ("assistant", ["T:ok"]),
        ("user", ["I:blue", "T:which?"]),
        ("assistant", ["T:blue"]),
    ]


def test_llava_single_image_column(tmp_path):
    folder_of_images(tmp_path)
    rows = [
        {
            "image": "photos/blue.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Blue."}],
        }
    ]
    structured, check = run(write_jsonl(tmp_path / "d.jsonl", rows))
    assert layout(check.conversations[0]) == [("user", ["I:blue", "T:Colour?"]), ("assistant", ["T:Blue."])]


# -- files: Parquet, datasets folders, CSV with a folder of images ------------------------------


def test_parquet_with_image_feature(tmp_path):
    import datasets

    folder_of_images(tmp_path)
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List(datasets.Image()),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}],
                [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "blue"}],
            ],
            # one image stored in the file (bytes), one by its path
            "images": [[{"bytes": png(RED), "path": "red.png"}], [str(tmp_path / "photos" / "blue.png")]],
        },
        features=features,
    )
    ds.to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "photos" / "red.png").unlink()  # the bytes in the file are used, not a file of that name
    structured, check = run(tmp_path / "train.parquet")
    assert structured.raw.kind == "parquet" and not structured.report.problems
    assert [layout(c)[0][1][0] for c in check.conversations] == ["I:red", "I:blue"]


@pytest.mark.parametrize("sequence", ["List", "Sequence"])
def test_saved_dataset_with_image_feature_and_a_truncated_image(tmp_path, sequence):
    import datasets

    rows = {
        "messages": [
            [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": c}]
            for c in ("red", "green", "blue")
        ],
        "images": [
            [{"bytes": png(RED), "path": None}],
            [{"bytes": truncated(noise(64, 64), "PNG"), "path": None}],
            [{"bytes": png(BLUE), "path": None}],
        ],
    }
    feature = getattr(datasets, sequence)(datasets.Image())
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": feature,
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    structured, check = run(tmp_path / "saved")
    assert structured.raw.kind == "saved"
    # one bad image costs its row, not the whole read
    assert problems(structured) == {
        1: "image 1: embedded image ("
        + f"{len(rows['images'][1][0]['bytes']):,}"
        + " bytes) is truncated (the file ends before the image does)"
    }
    assert [layout(c)[0][1][0] for c in check.conversations] == ["I:red", "I:blue"]


def test_csv_with_a_folder_of_images(tmp_path):
    folder_of_images(tmp_path)
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion", "images"])
        writer.writerow(["Colour?", "red", "photos/red.png"])
        writer.writerow(["Both?", "green, blue", json.dumps(["photos/green.jpg", "photos/blue.png"])])
    structured, check = run(path)
    assert structured.raw.kind == "csv" and not structured.report.problems
    assert layout(check.conversations[1]) == [
        ("user", ["I:green", "I:blue", "T:Both?"]),
        ("assistant", ["T:green, blue"]),
    ]


def test_relative_paths_resolve_against_the_data_files_folder(tmp_path, monkeypatch):
    folder_of_images(tmp_path / "set")
    write_jsonl(
        tmp_path / "set" / "d.jsonl", [{"prompt": "Colour?", "completion": "red", "images": ["photos/red.png"]}]
    )
    monkeypatch.chdir(tmp_path)  # the working directory is not the data file's folder
    structured, check = run("set/d.jsonl")
    assert not structured.report.problems and layout(check.conversations[0])[0][1][0] == "I:red"


# -- bad rows, each with its index ----------------------------------------------------------------


def test_each_bad_image_reported_with_its_row(tmp_path):
    folder_of_images(tmp_path)
    write(tmp_path / "bad" / "text.png", b"this is not a picture")
    write(tmp_path / "bad" / "corrupt.png", corrupt_png(noise(64, 64)))
    write(tmp_path / "bad" / "cut.jpg", truncated(noise(96, 96), "JPEG"))
    write(tmp_path / "bad" / "cut.png", truncated(noise(96, 96), "PNG"))
    write(tmp_path / "bad" / "tiny.png", png(RED, (10, 40)))
    write(tmp_path / "bad" / "wide.png", png(RED, (630, 14)))

    def row(*images, text="<image> Colour?"):
        return {
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}],
            "images": list(images),
        }

    rows = [row("photos/red.png") for _ in range(10)]
    rows[1] = row("bad/missing.png")
    rows[2] = row("bad/text.png")
    rows[3] = row("bad/corrupt.png")
    rows[4] = row("photos/red.png", "bad/cut.jpg", text="<image><image>")
    rows[5] = row("bad/cut.png")
    rows[6] = row("bad/tiny.png")
    rows[7] = row("bad/wide.png")
    rows[8] = row("photos/red.png", text="<image> and <image>")
    rows[9] = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": "x"},
        ],
        "images": ["photos/red.png"],
    }
    structured, check = run(write_jsonl(tmp_path / "d.jsonl", rows))
    found = problems(structured)
    assert set(found) == set(range(1, 10))
    assert found[1].startswith("image 1: file bad/missing.png does not exist")
    assert found[2].startswith("image 1: file bad/text.png is not an image file")
    assert found[3].startswith("image 1: file bad/corrupt.png is corrupt")
    assert found[4] == "image 2: file bad/cut.jpg is truncated (the file ends before the image does)"
    assert found[5] == "image 1: file bad/cut.png is truncated (the file ends before the image does)"
    assert found[6] == "image 1: file bad/tiny.png is 10x40 pixels, smaller than the 14-pixel side this model needs"
    assert found[7] == (
        "image 1: file bad/wide.png is 630x14 pixels, an aspect ratio of 45:1, more than the 20:1 this model accepts"
    )
    assert found[8] == (
        "image placeholders do not match the images: the text holds 2 `<image>` markers "
        "but the row has 1 image in `images`"
    )
    assert found[9].startswith("image placeholders do not match the images: the messages hold 2 image placeholders")
    assert [c.source_index for c in check.conversations] == [0]
    assert structured.report.bad_rows == 9
    # the summary groups image problems by what is wrong, whatever the file
    kinds = structured.report.reason_counts()
    assert kinds["image N: file … is truncated"] == 2 and kinds["image N: file … does not exist"] == 1


def test_run_stops_only_over_max_bad_fraction(tmp_path):
    from sftop.engine.errors import DataError

    folder_of_images(tmp_path)
    rows = [{"prompt": "Colour?", "completion": "red", "images": ["photos/red.png"]} for _ in range(20)]
    rows[4]["images"] = ["photos/gone.png"]
    structured, _ = run(write_jsonl(tmp_path / "d.jsonl", rows))
    structured.report.raise_if_too_many(0.05)  # 1 of 20 = 5%: goes on
    rows[5]["images"] = ["photos/gone.png"]
    structured, _ = run(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"2 of 20 rows .*row 4: image 1: file photos/gone.png does not exist"):
        structured.report.raise_if_too_many(0.05)


def test_text_model_still_rejects_image_rows(tmp_path):
    folder_of_images(tmp_path)
    rows = [{"prompt": "Colour?", "completion": "red", "images": ["photos/red.png"]}]
    structured = validate_structure(DataSection(source=str(write_jsonl(tmp_path / "d.jsonl", rows))), strict=False)
    assert problems(structured) == {0: "message 0 holds an image, and this model reads text only"}


def test_text_datasets_keep_image_markers_as_text():
    conv = normalise_image_row({"prompt": "Write <image> in HTML", "completion": "<img>"}, "prompt_completion", 0)
    assert conv.messages[0].content == (TextPart("Write <image> in HTML"),)
    with pytest.raises(RowError, match="but the row has no image column"):
        normalise_image_row({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages", 0)
    with pytest.raises(RowError, match="a plain-text row cannot carry images"):
        normalise_image_row({"text": "doc", "images": ["a.png"]}, "text", 0, "images")


def test_row_stage_functions(tmp_path):
    folder_of_images(tmp_path)
    conv = attach_images(
        normalise_image_row({"prompt": "Colour?", "completion": "red"}, "prompt_completion", 3),
        ["photos/red.png", "photos/green.jpg"],
        column="images",
    )
    resolved = resolve_row_images(conv, tmp_path, RULES)
    assert layout(resolved)[0] == ("user", ["I:red", "I:green", "T:Colour?"])
    assert resolved.source_index == 3 and all(
        p.image.mode == "RGB" for p in resolved.messages[0].content if isinstance(p, ImagePart)
    )
    plain = normalise_image_row({"prompt": "Colour?", "completion": "red"}, "prompt_completion")
    big = attach_images(plain, ["photos/red.png", {"bytes": encoded(noise(400, 300)), "path": None}], column="images")
    row = load_row_images(big, tmp_path, RULES)
    assert row.sizes == [((56, 42), (56, 42)), ((400, 300), (126, 98))]
    plain = normalise_image_row({"prompt": "x", "completion": "y"}, "prompt_completion")
    with pytest.raises(RowError, match=r"^image 2: file photos/nope.png does not exist"):
        load_row_images(attach_images(plain, ["photos/red.png", "photos/nope.png"], column="images"), tmp_path, RULES)


def test_image_stats():
    sizes = [[((56, 42), (56, 42))], [((400, 300), (112, 98)), ((56, 42), (56, 42))], []]
    stats = ImageStats.build(sizes, RULES, text_tokens=100, image_tokens=lambda w, h: (w // 14) * (h // 14))
    assert stats.images_per_row == {0: 1, 1: 1, 2: 1}
    assert stats.images == 3 and stats.rows_with_images == 2 and stats.resized == 1
    assert stats.original.width == (56, 56, 400) and stats.final.pixels == (2352, 2352, 10976)
    assert stats.tokens_per_image == (12, 12, 56)
    assert stats.image_tokens == 80 and stats.image_tokens_per_row_max == 68
    assert stats.image_token_share == pytest.approx(80 / 180)
    assert ImageStats.build(sizes, RULES).image_token_share is None


def test_one_call_for_a_vision_run(tmp_path):
    from sftop.engine.data.image_check import validate_image_rows
    from sftop.engine.errors import DataError

    folder_of_images(tmp_path)
    rows = [{"prompt": "Colour?", "completion": "red", "images": ["photos/red.png"]} for _ in range(4)]
    rows[2]["images"] = ["photos/gone.png"]
    source = str(write_jsonl(tmp_path / "d.jsonl", rows))
    section = DataSection(source=source, max_bad_fraction=0.25, max_pixels=28 * 28 * 2, min_pixels=14 * 14)
    structured, check = validate_image_rows(section, RULES)
    assert [c.source_index for c in structured.conversations] == [0, 1, 3]
    assert check.sizes[0] == [((56, 42), (42, 28))]  # the preset's budget (1,568 pixels), on the family's grid
    assert isinstance(check.conversations[0].messages[0].content[0].image, str)  # references kept
    with pytest.raises(DataError, match="1 of 4 rows"):
        validate_image_rows(section.model_copy(update={"max_bad_fraction": 0.1}), RULES)


def test_image_part_keys_of_chat_templates(tmp_path):
    """transformers' chat templates take `url`, `path` and `base64` image parts too."""
    import base64

    folder_of_images(tmp_path)
    content = [
        {"type": "image", "url": "photos/red.png"},
        {"type": "image", "path": "photos/green.jpg"},
        {"type": "image", "base64": base64.b64encode(png(BLUE)).decode()},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png(RED)).decode()}},
        {"type": "text", "text": "Four?"},
    ]
    conv = normalise_image_row(
        {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "yes"}]}, "messages", 0
    )
    assert layout(resolve_row_images(conv, tmp_path, RULES))[0] == (
        "user",
        ["I:red", "I:green", "I:blue", "I:red", "T:Four?"],
    )
