"""Helpers for the vision-language training tests: a small image dataset on disk, fast VLM presets."""

import json
import random
from pathlib import Path

from sftop.engine.presets.schema import Preset

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}


def write_colour_dataset(folder: Path, rows: int = 24, seed: int = 0, size: int = 56, bad: dict | None = None) -> Path:
    """JSONL rows asking the colour of a square, each with its PNG referenced by a relative path.

    `bad`: row index -> what to write instead of a good image ("missing", "corrupt").
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        colour = rng.choice(sorted(COLOURS))
        name = f"img/{i}.png"
        (folder / "img").mkdir(exist_ok=True)
        kind = (bad or {}).get(i)
        if kind == "corrupt":
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        elif kind != "missing":
            image = Image.new("RGB", (size, size), (255, 255, 255))
            x, y = rng.randint(2, size // 2), rng.randint(2, size // 2)
            ImageDraw.Draw(image).rectangle([x, y, x + size // 3, y + size // 3], fill=COLOURS[colour])
            image.save(folder / name)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
                        },
                        {"role": "assistant", "content": [{"type": "text", "text": colour}]},
                    ],
                    "images": [name],
                }
            )
        )
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def vlm_preset(source, model: str = "builtin:demo-vlm-tiny", **sections) -> Preset:
    data = {
        "name": "vlm-test",
        "model": {"name": model},
        "lora": {"r": 8, "alpha": 16},
        "data": {"source": str(source), "max_length": 96},
        "train": {
            "kernels": "off",
            "max_steps": 4,
            "effective_batch": 4,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "save_steps": 2,
            "logging_steps": 1,
        },
        "plan": {"micro_batch": 4, "grad_accum": 1, "gradient_checkpointing": "off"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return Preset.model_validate(data)


def write_colour_preferences(
    folder: Path, rows: int = 8, seed: int = 0, size: int = 56, layout: str = "trl", bad: dict | None = None
) -> Path:
    """Preference pairs on the colour pictures: the right colour chosen, another one rejected.

    `layout`: "trl" (TRL's vision layout as in the rlaif-v formatted set: `images` column, `prompt`
    messages with an image placeholder, `chosen`/`rejected` assistant messages) or "rlaif-v" (RLAIF-V's
    raw rows: `image`, `question`, `chosen`, `rejected` strings). `bad`: row index -> "missing" or
    "corrupt" image.
    """
    source = write_colour_dataset(folder, rows=rows, seed=seed, size=size, bad=bad)
    rng = random.Random(seed + 1)
    lines = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        colour = row["messages"][1]["content"][0]["text"]
        wrong = rng.choice(sorted(set(COLOURS) - {colour}))
        if layout == "rlaif-v":
            lines.append(
                json.dumps(
                    {
                        "image": row["images"][0],
                        "question": "What colour is the shape?",
                        "chosen": colour,
                        "rejected": wrong,
                    }
                )
            )
        else:
            lines.append(
                json.dumps(
                    {
                        "images": row["images"],
                        "prompt": [row["messages"][0]],
                        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
                    }
                )
            )
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mixed_dataset(folder: Path, rows: int = 12, seed: int = 0, sizes=((56, 56), (84, 56), (56, 112))) -> Path:
    """Rows of mixed text lengths holding 0 to 2 images of mixed sizes: their lengths differ, so a
    padded batch carries padding that a packed one does not."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        names = []
        for k in range(rng.choice((0, 1, 1, 2))):
            width, height = rng.choice(sizes)
            name = f"img/{i}-{k}.png"
            Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3))).save(folder / name)
            names.append(name)
        question = " ".join(
            rng.choice(("what", "colour", "shape", "is", "the", "left", "one")) for _ in range(rng.randint(2, 14))
        )
        answer = " ".join(rng.choice(sorted(COLOURS)) for _ in range(rng.randint(1, 10)))
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": question}]
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": content},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                    ],
                    "images": names,
                }
            )
        )
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_vlm(folder: Path, family_name: str) -> Path:
    """A family's tiny random-init model and offline processor saved as a local model directory."""
    from sftop.engine.models.vision.registry import all_families

    family = all_families()[family_name]
    if not (folder / "config.json").is_file():
        family.tiny_model().save_pretrained(folder)
        family.offline_processor().save_pretrained(folder)
    return folder
