"""`builtin:shapes`: small generated pictures of coloured shapes, with short exact questions.

Every picture is drawn with Pillow: circles, squares and triangles in red, green, blue or yellow on
a light background, one shape per 28-pixel cell (so shapes never touch), without anti-aliasing
(so every shape pixel has exactly its colour). Sides are 56, 84 or 112 pixels: on the 14- and
28-pixel grids of most families (others resize them to their own grid), small enough that a tiny
model trains on a CPU in minutes.

Questions (the `kind` column says which):

- `colour`: "What colour is the circle?" -> "red"
- `shape`: "What shape is the blue one?" -> "triangle"
- `count`: "How many shapes are there?" / "How many squares are there?" -> "3"
- `position`: "Where is the triangle? Answer top left, top right, bottom left or bottom right." -> "top left"
- `compare` (two images): "Which image has more circles, the first or the second?" -> "second"
- `colour_of_image` (two images): "What colour is the shape in the second image?" -> "green"

Rows use TRL's layout: `messages` whose user turn holds `{"type": "image"}` placeholders, and an
`images` column holding the pictures as PIL images (palette mode, converted to RGB like any other
image when the rows are checked). The same seed always yields the same rows; `shapes_heldout()` uses another seed, for
scoring a trained model on pictures it has not seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (228, 228, 228), (246, 236, 214))
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CELL = 28
SIDES: tuple[int, ...] = (56, 84, 112)
CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

SHAPES_ROWS = 3000
SHAPES_SEED = 7
HELDOUT_SEED = 7_000_007


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (inclusive)

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def count(self, kind: str | None = None, colour: str | None = None) -> int:
        return sum(
            1 for s in self.shapes if (kind is None or s.kind == kind) and (colour is None or s.colour == colour)
        )

    def draw(self):
        """The picture as a palette image (one byte per pixel: a few thousand of them stay small)."""
        from PIL import Image, ImageDraw

        image = Image.new("P", (self.width, self.height), 0)
        image.putpalette([*self.background, *(v for rgb in COLOURS.values() for v in rgb)])
        index = {name: i + 1 for i, name in enumerate(COLOURS)}
        pen = ImageDraw.Draw(image)
        for s in self.shapes:
            fill = index[s.colour]
            left, top, right, bottom = s.box
            if s.kind == "circle":
                pen.ellipse(s.box, fill=fill)
            elif s.kind == "square":
                pen.rectangle(s.box, fill=fill)
            else:
                pen.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
        return image


def _picture(
    rng: random.Random,
    shapes: list[tuple[str, str]],
    *,
    width: int | None = None,
    height: int | None = None,
    cells: list[tuple[int, int]] | None = None,
) -> Picture:
    """A picture with the given (kind, colour) shapes, each in its own random cell."""
    width = width or rng.choice(SIDES)
    height = height or rng.choice(SIDES)
    free = cells if cells is not None else [(cx, cy) for cx in range(width // CELL) for cy in range(height // CELL)]
    chosen = rng.sample(free, len(shapes))
    placed = []
    for (kind, colour), (cx, cy) in zip(shapes, chosen):
        size = rng.randint(16, 22)
        left = cx * CELL + rng.randint(3, CELL - 3 - size)
        top = cy * CELL + rng.randint(3, CELL - 3 - size)
        placed.append(Shape(kind, colour, (left, top, left + size - 1, top + size - 1)))
    return Picture(width, height, rng.choice(BACKGROUNDS), tuple(placed))


def _distinct_shapes(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n shapes, no two of the same kind and no two of the same colour (so either names one)."""
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    return list(zip(kinds, colours))


def _random_shapes(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]


def _corner(picture: Picture, shape: Shape) -> str:
    x, y = shape.centre
    return CORNERS[(2 if y >= picture.height / 2 else 0) + (1 if x >= picture.width / 2 else 0)]


# Each maker returns (pictures, question, answer).
def _colour(rng):
    picture = _picture(rng, _distinct_shapes(rng, rng.randint(1, 3)))
    target = rng.choice(picture.shapes)
    return [picture], f"What colour is the {target.kind}?", target.colour


def _shape(rng):
    picture = _picture(rng, _distinct_shapes(rng, rng.randint(1, 3)))
    target = rng.choice(picture.shapes)
    return [picture], f"What shape is the {target.colour} one?", target.kind


def _count(rng):
    picture = _picture(rng, _random_shapes(rng, rng.randint(1, 4)))
    if rng.random() < 0.5:
        return [picture], "How many shapes are there?", str(len(picture.shapes))
    kind = rng.choice(SHAPES)
    return [picture], f"How many {kind}s are there?", str(picture.count(kind=kind))


def _position(rng):
    # sides that split evenly into halves, so that every cell lies in one corner
    width, height = rng.choice((56, 112)), rng.choice((56, 112))
    picture = _picture(rng, _distinct_shapes(rng, rng.randint(1, 2)), width=width, height=height)
    target = rng.choice(picture.shapes)
    question = f"Where is the {target.kind}? Answer top left, top right, bottom left or bottom right."
    return [picture], question, _corner(picture, target)


def _compare(rng):
    kind = rng.choice(SHAPES)
    while True:
        first, second = _random_count_of(rng, kind), _random_count_of(rng, kind)
        if first.count(kind=kind) != second.count(kind=kind):
            break
    answer = "first" if first.count(kind=kind) > second.count(kind=kind) else "second"
    return [first, second], f"Which image has more {kind}s, the first or the second?", answer


def _random_count_of(rng, kind):
    n = rng.randint(1, 4)
    k = rng.randint(0, n)
    shapes = [(kind, rng.choice(list(COLOURS))) for _ in range(k)]
    shapes += [(rng.choice([s for s in SHAPES if s != kind]), rng.choice(list(COLOURS))) for _ in range(n - k)]
    rng.shuffle(shapes)
    return _picture(rng, shapes)


def _colour_of_image(rng):
    colours = rng.sample(list(COLOURS), 2)
    pictures = [_picture(rng, [(rng.choice(SHAPES), c)]) for c in colours]
    which = rng.randrange(2)
    return pictures, f"What colour is the shape in the {('first', 'second')[which]} image?", colours[which]


_KINDS = (
    ("colour", _colour, 0.25),
    ("shape", _shape, 0.2),
    ("count", _count, 0.2),
    ("position", _position, 0.15),
    ("compare", _compare, 0.1),
    ("colour_of_image", _colour_of_image, 0.1),
)


def _row(rng: random.Random) -> dict:
    name, make, _ = rng.choices(_KINDS, weights=[w for *_, w in _KINDS])[0]
    pictures, question, answer = make(rng)
    user = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": question}]
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [p.draw() for p in pictures],
        "kind": name,
        "answer": answer,
    }


@lru_cache(maxsize=4)
def _generate(n: int, seed: int) -> tuple[dict, ...]:
    rng = random.Random(seed)
    return tuple(_row(rng) for _ in range(n))


def shapes_rows(n: int = SHAPES_ROWS, seed: int = SHAPES_SEED) -> list[dict]:
    """n rows generated from `seed` (the same arguments always give the same rows)."""
    return [dict(row) for row in _generate(n, seed)]


def shapes() -> list[dict]:
    """The `builtin:shapes` set."""
    return shapes_rows()


def shapes_heldout(n: int = 200, seed: int = HELDOUT_SEED) -> list[dict]:
    """Rows from another seed, to score a model trained on `builtin:shapes` on unseen pictures.

    Each row's `answer` column is the exact expected answer; `kind` is the kind of question.
    """
    return shapes_rows(n, seed)


def row_pictures(row: dict) -> list:
    """The RGB images of a generated row."""
    return [image.convert("RGB") for image in row["images"]]


# The answers a question of each kind can have: a rejected answer is another one of them.
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(5)),
    "position": CORNERS,
    "compare": ("first", "second"),
    "colour_of_image": tuple(COLOURS),
}
PREFERENCE_ROWS = 1000


def shapes_preferences(n: int = PREFERENCE_ROWS, seed: int = SHAPES_SEED) -> list[dict]:
    """The `builtin:shapes-preferences` set: the first `n` shapes questions as preference pairs in
    TRL's vision layout (`images`, `prompt` with the image placeholders, `chosen`, `rejected`): the
    right answer chosen, another answer to the same kind of question rejected (a wrong colour, count,
    corner, ...), so only the picture tells them apart."""
    rng = random.Random(seed + 1)
    pairs = []
    for row in shapes_rows(max(n, 1), seed)[:n]:
        wrong = rng.choice([a for a in ANSWERS[row["kind"]] if a != row["answer"]])
        pairs.append(
            {
                "images": row["images"],
                "prompt": [row["messages"][0]],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
                "kind": row["kind"],
            }
        )
    return pairs
