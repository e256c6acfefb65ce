"""Small image files for the vision data tests, written with Pillow into a test's tmp_path."""

from __future__ import annotations

import io
import random

from PIL import Image


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels: compress badly, so a file cut short really is missing image data."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def truncated(image: Image.Image, fmt: str) -> bytes:
    data = encoded(image, fmt)
    return data[: len(data) // 2]


def corrupt_png(image: Image.Image) -> bytes:
    """A PNG whose compressed pixel data is overwritten (header intact)."""
    data = bytearray(encoded(image, "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = bytes(40)
    return bytes(data)


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
