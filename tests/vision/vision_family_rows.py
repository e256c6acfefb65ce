"""Rows, families and tiny models shared by the vision family tests (built once per session)."""

from __future__ import annotations

import functools

from PIL import Image

from sftop.engine.data.conversation import Conversation, ImagePart, Message, TextPart
from sftop.engine.models.vision.registry import all_families

# The end-of-turn token each family's template closes an assistant turn with (trained).
END_OF_TURN = {
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "qwen3_vl": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "llava": "</s>",
    "llava_next": "</s>",
    "mllama": "<|eot_id|>",
}

# What the template puts between the generation prompt and the assistant's text, trained with it
# (Idefics3's "Assistant:" prompt is followed by ": text" in the full render).
ASSISTANT_PREFIX = {"idefics3": " ", "smolvlm": " ", "llava": " ", "llava_next": " "}

FAMILY_NAMES = sorted(all_families())


def family(name: str):
    return all_families()[name]


@functools.lru_cache(maxsize=None)
def processor(name: str):
    return family(name).offline_processor()


@functools.lru_cache(maxsize=None)
def model(name: str):
    return family(name).tiny_model().eval()


# Tiled families rescale every image to whole tiles themselves: small test images will do.
TEST_STEP = {"idefics3": 28, "smolvlm": 28}


def image(name: str, width_blocks: int, height_blocks: int, colour=(200, 30, 30)) -> Image.Image:
    """An RGB image already on the family's patch grid (as the data layer leaves it)."""
    step = TEST_STEP.get(name, family(name).image_rules.patch_multiple)
    img = Image.new("RGB", (width_blocks * step, height_blocks * step), (240, 240, 240))
    img.paste(colour, (step // 2, step // 2, width_blocks * step - step // 2, height_blocks * step - step // 2))
    return img


def single(img, question: str = "What colour is the square?", answer: str = "red", index: int = 0) -> Conversation:
    return Conversation(
        (Message("user", (ImagePart(img), TextPart(question))), Message.text("assistant", answer)), source_index=index
    )


def rows(name: str) -> dict[str, Conversation]:
    """Single- and multi-image rows, with and without a system turn, one and two assistant turns."""
    fam = family(name)
    a, b = image(name, 2, 3), image(name, 3, 2, (30, 30, 200))
    user = lambda *parts: Message("user", tuple(TextPart(p) if isinstance(p, str) else ImagePart(p) for p in parts))
    said = lambda text: Message.text("assistant", text)
    out = {
        "single": single(a),
        "single-system": Conversation(
            (Message.text("system", "Answer with a word only."), user(a, "What colour is the square?"), said("Red.")),
            source_index=1,
        ),
        "two-turns": Conversation(
            (user(a, "What shape is this?"), said("a square"), user("And its colour?"), said("red")), source_index=2
        ),
    }
    if fam.supports_multiple_images:
        out["multi"] = Conversation(
            (user("first", a, "second", b, "Which one is blue?"), said("the second one")), source_index=3
        )
        out["multi-system-turns"] = Conversation(
            (
                Message.text("system", "You compare two images."),
                user(a, "Look at this."),
                said("I see a red square."),
                user(b, "And this one: which colour?"),
                said("blue"),
            ),
            source_index=4,
        )
    return out
