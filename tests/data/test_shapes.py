"""builtin:shapes: deterministic, and every answer true of the pixels actually drawn."""

import re
from collections import Counter

from sftop.engine.data.builtin import builtin_names, load_builtin
from sftop.engine.data.shapes import COLOURS, HELDOUT_SEED, SHAPES_SEED, row_pictures, shapes_heldout, shapes_rows


def components(image):
    """Shapes found back in an RGB image: (kind, colour, centre) per connected patch of a shape colour."""
    width, height = image.size
    pixels = image.load()
    names = {rgb: name for name, rgb in COLOURS.items()}
    seen = set()
    found = []
    for y in range(height):
        for x in range(width):
            colour = names.get(pixels[x, y])
            if colour is None or (x, y) in seen:
                continue
            stack, patch = [(x, y)], []
            seen.add((x, y))
            while stack:
                px, py = stack.pop()
                patch.append((px, py))
                for nx, ny in ((px + 1, py), (px - 1, py), (px, py + 1), (px, py - 1)):
                    if 0 <= nx < width and 0 <= ny < height and (nx, ny) not in seen and pixels[nx, ny] == pixels[x, y]:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            xs, ys = [p[0] for p in patch], [p[1] for p in patch]
            box_area = (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)
            fill = len(patch) / box_area
            kind = "square" if fill > 0.97 else "circle" if fill > 0.68 else "triangle"
            centre = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
            found.append((kind, colour, centre))
    return found


def answer_from_pixels(question, images):
    shapes = [components(image) for image in images]
    one = shapes[0]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (colour,) = [c for k, c, _ in one if k == m[1]]
        return colour
    if m := re.fullmatch(r"What shape is the (\w+) one\?", question):
        (kind,) = [k for k, c, _ in one if c == m[1]]
        return kind
    if question == "How many shapes are there?":
        return str(len(one))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(1 for k, _, _ in one if k == m[1]))
    if m := re.match(r"Where is the (\w+)\?", question):
        ((x, y),) = [centre for k, _, centre in one if k == m[1]]
        width, height = images[0].size
        return ("bottom " if y >= height / 2 else "top ") + ("right" if x >= width / 2 else "left")
    if m := re.fullmatch(r"Which image has more (\w+)s, the first or the second\?", question):
        first, second = (sum(1 for k, _, _ in s if k == m[1]) for s in shapes)
        assert first != second
        return "first" if first > second else "second"
    if m := re.fullmatch(r"What colour is the shape in the (first|second) image\?", question):
        ((_, colour, _),) = shapes[0 if m[1] == "first" else 1]
        return colour
    raise AssertionError(f"unexpected question {question!r}")


def question_of(row):
    return row["messages"][0]["content"][-1]["text"]


def test_registered_and_deterministic():
    assert "builtin:shapes" in builtin_names()
    rows = load_builtin("builtin:shapes")
    assert len(rows) == 3000
    again = shapes_rows(40, SHAPES_SEED)
    from sftop.engine.data import shapes as module

    module._generate.cache_clear()  # generated again from the seed, not served from the cache
    regenerated = shapes_rows(40, SHAPES_SEED)
    for a, b in zip(again, regenerated):
        assert question_of(a) == question_of(b) and a["answer"] == b["answer"]
        assert [p.tobytes() for p in row_pictures(a)] == [p.tobytes() for p in row_pictures(b)]
    heldout = shapes_heldout(40)
    assert [question_of(r) for r in heldout] != [question_of(r) for r in again]
    assert heldout[0]["images"][0].tobytes() != again[0]["images"][0].tobytes()
    assert shapes_heldout(40, HELDOUT_SEED)[0]["answer"] == heldout[0]["answer"]


def test_mix_of_questions_and_short_answers():
    rows = shapes_rows()
    kinds = Counter(r["kind"] for r in rows)
    assert set(kinds) == {"colour", "shape", "count", "position", "compare", "colour_of_image"}
    assert min(kinds.values()) > 150
    assert all(len(r["answer"].split()) <= 2 for r in rows)
    assert all(r["messages"][1]["content"][0]["text"] == r["answer"] for r in rows)
    counts = Counter(len(r["images"]) for r in rows)
    assert set(counts) == {1, 2} and counts[2] > 400
    sides = {side for r in rows for image in r["images"] for side in image.size}
    assert sides <= {56, 84, 112}


def test_every_answer_is_true_of_the_pixels():
    rows = shapes_rows(3000)
    picked = []
    by_kind = Counter()
    for row in rows:
        if by_kind[row["kind"]] < 12:
            by_kind[row["kind"]] += 1
            picked.append(row)
    assert len(picked) == 72
    for row in picked:
        images = row_pictures(row)
        assert answer_from_pixels(question_of(row), images) == row["answer"], (question_of(row), row["answer"])
    for row in shapes_heldout(30):
        assert answer_from_pixels(question_of(row), row_pictures(row)) == row["answer"]


def test_rows_go_through_the_image_pipeline():
    from sftop.engine.data.image_check import check_structured_images
    from sftop.engine.data.images import ImageRules
    from sftop.engine.data.prepare import validate_structure
    from sftop.engine.presets.schema import DataSection

    rules = ImageRules(patch_multiple=28, min_edge=28, max_pixels=112 * 112, min_pixels=56 * 56)
    structured = validate_structure(DataSection(source="builtin:shapes", max_rows=200), strict=False, allow_images=True)
    check = check_structured_images(structured, rules)
    assert structured.format == "messages" and not structured.report.problems
    assert len(check.conversations) == 200
    # the pictures are on the grid and within budget already: nothing is resized
    assert all(original == final for row in check.sizes for original, final in row)
