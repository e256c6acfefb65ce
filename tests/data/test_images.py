import math

import pytest
from image_fixtures import corrupt_png, encoded, noise, truncated, write
from PIL import Image

from sftop.engine.data.images import (
    ImageError,
    ImageRules,
    check_image_size,
    effective_image_rules,
    fit_pixel_budget,
    open_image,
    prepare_image,
    resize_to_budget,
    rules_with_budget,
    to_rgb,
)
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import DataSection

QWEN_LIKE = ImageRules(
    patch_multiple=28, min_edge=28, max_pixels=256 * 28 * 28, min_pixels=4 * 28 * 28, max_aspect_ratio=200.0
)


# -- opening every kind of reference ------------------------------------------------------------


def test_open_every_reference_kind(tmp_path):
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    data = encoded(image)
    write(tmp_path / "imgs" / "a.png", data)
    refs = [
        image,
        data,
        bytearray(data),
        {"bytes": data, "path": "a.png"},
        {"bytes": None, "path": str(tmp_path / "imgs" / "a.png")},
        "imgs/a.png",  # relative to the dataset's folder
        str(tmp_path / "imgs" / "a.png"),
        "file://" + str(tmp_path / "imgs" / "a.png"),
        "data:image/png;base64," + __import__("base64").b64encode(data).decode(),
        {"url": "imgs/a.png"},
    ]
    for ref in refs:
        out = open_image(ref, tmp_path)
        assert out.mode == "RGB" and out.size == (30, 20) and out.getpixel((3, 3)) == (10, 200, 30), ref


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: "nope/missing.png", "file nope/missing.png does not exist"),
        (lambda tmp: write(tmp / "text.png", b"hello, I am text"), "is not an image file sftop can read"),
        (lambda tmp: write(tmp / "cut.jpg", truncated(noise(64, 64), "JPEG")), "is truncated"),
        (lambda tmp: write(tmp / "cut.png", truncated(noise(64, 64), "PNG")), "is truncated"),
        (lambda tmp: write(tmp / "bad.png", corrupt_png(noise(64, 64))), "is corrupt"),
        (lambda tmp: write(tmp / "empty.png", b""), "is not an image file"),
        (lambda tmp: "https://example.com/a.png", "is a URL; sftop does not download images"),
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: 42, "is a int, expected a file path, bytes or an image"),
        (lambda tmp: {"bytes": None, "path": None}, "holds neither bytes nor a path"),
    ],
)
def test_bad_images_say_what_is_wrong(tmp_path, make, expected):
    ref = make(tmp_path)
    ref = str(ref) if hasattr(ref, "is_file") else ref
    with pytest.raises(ImageError) as info:
        open_image(ref, tmp_path)
    assert expected in str(info.value)


def test_truncated_bytes_are_found_by_a_full_decode():
    # Opening reads only the header; the truncation shows when the pixels are decoded.
    data = truncated(noise(96, 96), "JPEG")
    Image.open(__import__("io").BytesIO(data))  # the header alone parses fine
    with pytest.raises(ImageError, match="inline image .* is truncated"):
        open_image(data)


def test_exif_orientation_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge is shown on top
    path = write(tmp_path / "phone.jpg", encoded(stored, "JPEG", exif=exif, quality=95))
    out = open_image(str(path))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_mode_conversions():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no black, full magenta+yellow: red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    assert to_rgb(transparent_palette).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # half-transparent black on white: mid grey
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.new("I;16", (4, 4), 65535)
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I;16", (4, 4), 257 * 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("I", (4, 4), 200)).getpixel((0, 0)) == (200, 200, 200)  # 8-bit data in "I"
    assert to_rgb(Image.new("I", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    for image in (cmyk, palette, half, sixteen):
        assert to_rgb(image).mode == "RGB"


def test_sixteen_bit_png_file(tmp_path):
    image = Image.new("I;16", (30, 30), 257 * 40)
    path = write(tmp_path / "deep.png", encoded(image))
    assert open_image(str(path)).getpixel((1, 1)) == (40, 40, 40)


# -- size rules ---------------------------------------------------------------------------------


def test_too_small_and_too_elongated():
    check_image_size(28, 28, QWEN_LIKE)
    with pytest.raises(ImageError, match="is 20x100 pixels, smaller than the 28-pixel side"):
        check_image_size(20, 100, QWEN_LIKE)
    check_image_size(28, 28 * 200, QWEN_LIKE)  # exactly 200:1 is accepted
    with pytest.raises(ImageError, match="aspect ratio of 201:1, more than the 200:1"):
        check_image_size(28, 28 * 201, QWEN_LIKE)
    no_limit = ImageRules(patch_multiple=14, min_edge=14, max_pixels=10**6, min_pixels=1)
    check_image_size(14, 14 * 1000, no_limit)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((448, 448), (448, 448)),  # already on the grid and within budget: unchanged
        ((1000, 1000), (448, 448)),  # 1e6 px -> budget 200704 = 448^2
        ((4000, 3000), (504, 392)),
        ((640, 480), (504, 392)),
        ((30, 30), (56, 56)),  # below min_pixels: scaled up to the minimum
        ((120, 80), (112, 84)),  # within budget: only snapped
        ((10, 10000), (28, 7168)),  # pinned at one multiple; the long side shrinks to the budget
    ],
)
def test_pixel_budget_values(size, expected):
    assert fit_pixel_budget(*size, QWEN_LIKE) == expected


@pytest.mark.parametrize("patch", [14, 16, 28, 32])
def test_pixel_budget_properties(patch):
    rules = ImageRules(
        patch_multiple=patch, min_edge=patch, max_pixels=300 * patch * patch, min_pixels=8 * patch * patch
    )
    import random

    rng = random.Random(patch)
    for _ in range(400):
        w, h = rng.randint(patch, 5000), rng.randint(patch, 5000)
        if max(w, h) / min(w, h) > 20:
            continue
        fw, fh = fit_pixel_budget(w, h, rules)
        assert fw % patch == 0 and fh % patch == 0 and fw >= patch and fh >= patch
        assert rules.min_pixels <= fw * fh <= rules.max_pixels, (w, h, fw, fh)
        # aspect kept: each side within one patch of the exactly scaled size
        scale = 1.0
        if w * h > rules.max_pixels:
            scale = math.sqrt(rules.max_pixels / (w * h))
        elif w * h < rules.min_pixels:
            scale = math.sqrt(rules.min_pixels / (w * h))
        assert abs(fw - w * scale) < patch and abs(fh - h * scale) < patch, (w, h, fw, fh)


def test_resize_and_prepare(tmp_path):
    image = noise(1000, 500)
    resized = resize_to_budget(image, QWEN_LIKE)
    assert resized.size == fit_pixel_budget(1000, 500, QWEN_LIKE) == (644, 308)
    fits = Image.new("RGB", (112, 56))
    assert resize_to_budget(fits, QWEN_LIKE) is fits
    path = write(tmp_path / "big.png", encoded(Image.new("RGBA", (1000, 500), (0, 0, 0, 0))))
    prepared = prepare_image("big.png", QWEN_LIKE, tmp_path)
    assert prepared.original_size == (1000, 500) and prepared.size == (644, 308)
    assert prepared.image.mode == "RGB" and prepared.image.getpixel((5, 5)) == (255, 255, 255)
    assert prepared.subject == "file big.png"
    with pytest.raises(ImageError, match="file small.png is 20x20 pixels"):
        write(tmp_path / "small.png", encoded(Image.new("RGB", (20, 20))))
        prepare_image("small.png", QWEN_LIKE, path.parent)


def test_budget_from_the_preset():
    assert effective_image_rules(QWEN_LIKE, DataSection()) == QWEN_LIKE
    rules = effective_image_rules(QWEN_LIKE, DataSection(max_pixels=100_000, min_pixels=10_000))
    assert (rules.max_pixels, rules.min_pixels, rules.patch_multiple) == (100_000, 10_000, 28)
    assert fit_pixel_budget(1000, 1000, rules) == (308, 308)
    with pytest.raises(DataError, match="smaller than one image patch"):
        rules_with_budget(QWEN_LIKE, max_pixels=500)
    with pytest.raises(DataError, match="data.min_pixels = 300,000 is larger than data.max_pixels"):
        rules_with_budget(QWEN_LIKE, min_pixels=300_000)
