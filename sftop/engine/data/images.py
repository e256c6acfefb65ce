"""Images in training rows: how big they may be, and the rules a family's vision tower sets.

`ImageRules` is what a vision-language family tells the data layer (see
`sftop.engine.models.vision.family.VisionFamily.image_rules`); the data layer opens, checks and
resizes every image against it before any GPU time is spent.

The steps, each usable on its own:

- `open_image(ref, base_dir)`: any reference a row may hold (a PIL image, raw bytes, a
  `{"bytes": ..., "path": ...}` dict as `datasets`' Image feature stores it, a file path, a
  `data:` URI) -> a fully decoded RGB image with its EXIF orientation applied. A missing,
  unreadable, corrupt or truncated image raises `ImageError`, whose text is meant for the user.
- `check_image_size(width, height, rules)`: too small for the family's patch, or too elongated.
- `fit_pixel_budget(width, height, rules)`: the size the image is trained at.
- `prepare_image(ref, rules, base_dir)`: all of the above, returning a `PreparedImage`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sftop.engine.errors import DataError


@dataclass(frozen=True)
class ImageRules:
    """Limits one family's vision tower puts on an image.

    Resolution is a pixel budget, not an edge length: an image is scaled (aspect ratio kept) so
    that `min_pixels <= width * height <= max_pixels`, then each side is snapped to a multiple of
    `patch_multiple` pixels.
    """

    patch_multiple: int  # each side a multiple of this many pixels (patch size x merge size)
    min_edge: int  # an image whose shorter side is below this is refused, not upscaled into noise
    max_pixels: int
    min_pixels: int
    max_aspect_ratio: float | None = None  # long side / short side the family accepts (Qwen: 200)


class ImageError(ValueError):
    """One image cannot be used. `str()` reads "<what> <problem>", e.g. "file a.jpg is truncated"."""

    def __init__(self, subject: str, problem: str):
        super().__init__(f"{subject} {problem}")
        self.subject = subject
        self.problem = problem

    def __reduce__(self):  # picklable across worker processes despite the two-argument constructor
        return (type(self), (self.subject, self.problem))


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the processor: RGB, upright, at the size the pixel budget chose."""

    image: Any  # PIL.Image.Image, mode RGB, size == `size`
    original_size: tuple[int, int]  # (width, height) as stored, after EXIF rotation
    size: tuple[int, int]  # (width, height) after the pixel budget
    subject: str  # how the row refers to it, e.g. "file photos/a.jpg"


# -- opening ------------------------------------------------------------------------------------


def describe_image_ref(ref: Any) -> str:
    """How a reference is named in a problem report."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        name = getattr(ref, "filename", "") or ""
        return f"image {Path(name).name}" if name else "inline image"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"inline image ({len(ref):,} bytes)"
    if isinstance(ref, dict):
        path, data = ref.get("path"), ref.get("bytes")
        if data is not None:
            return f"embedded image {Path(str(path)).name}" if path else f"embedded image ({len(data):,} bytes)"
        if path:
            return f"file {path}"
        url = ref.get("url")
        if isinstance(url, str):
            return describe_image_ref(url)
        return "image"
    if isinstance(ref, (str, Path)):
        text = str(ref)
        if text.startswith("data:"):
            return "inline data: URI image"
        return f"file {text}" if not _is_url(text) else f"URL {text}"
    return "image"


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://", "ftp://", "s3://", "gs://", "hf://"))


def _resolve_path(text: str, base_dir: Path | None) -> Path:
    if text.startswith("file://"):
        text = text[len("file://") :]
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def _raw_source(ref: Any, base_dir: Path | None, subject: str) -> Any:
    """Bytes or a path for PIL to open, or an already open PIL image."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, (bytes, bytearray, memoryview)):
        if not len(ref):
            raise ImageError(subject, "is empty (0 bytes)")
        return io.BytesIO(bytes(ref))
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return _raw_source(ref["bytes"], base_dir, subject)
        for key in ("path", "url", "image"):
            if ref.get(key):
                return _raw_source(ref[key], base_dir, subject)
        raise ImageError(subject, "holds neither bytes nor a path")
    if isinstance(ref, Path):
        ref = str(ref)
    if isinstance(ref, str):
        text = ref.strip()
        if not text:
            raise ImageError(subject, "is an empty path")
        if text.startswith("data:"):
            header, _, payload = text.partition(",")
            if ";base64" not in header:
                raise ImageError(subject, "is a data: URI that is not base64-encoded")
            try:
                return io.BytesIO(base64.b64decode(payload, validate=False))
            except (binascii.Error, ValueError):
                raise ImageError(subject, "is a data: URI whose base64 payload is invalid") from None
        if _is_url(text):
            raise ImageError(subject, "is a URL; sftop does not download images: download them and refer to the files")
        path = _resolve_path(text, base_dir)
        if not path.exists():
            where = f" (looked for {path})" if str(path) != text else ""
            raise ImageError(subject, f"does not exist{where}")
        if path.is_dir():
            raise ImageError(subject, "is a folder, not an image file")
        return path
    if ref is None:
        raise ImageError(subject, "is missing (null)")
    raise ImageError(subject, f"is a {type(ref).__name__}, expected a file path, bytes or an image")


def _decode(source: Any, subject: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            raise ImageError(
                subject, "is not an image file sftop can read (not PNG, JPEG, WebP, GIF, BMP, TIFF, ...)"
            ) from None
        except Image.DecompressionBombError as exc:
            raise ImageError(subject, f"is too large to decode safely ({exc})") from None
        except PermissionError:
            raise ImageError(subject, "cannot be read (permission denied)") from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a header PIL recognises but cannot parse
            raise _bad_data(exc, subject) from None
    try:
        # Decode every pixel now: a truncated or corrupt file fails here, not mid-training.
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, EOFError... for bad data
        raise _bad_data(exc, subject) from None
    if image.width <= 0 or image.height <= 0:
        raise ImageError(subject, f"has no pixels ({image.width}x{image.height})")
    return image


def _bad_data(exc: Exception, subject: str) -> ImageError:
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return ImageError(subject, "is truncated (the file ends before the image does)")
    return ImageError(subject, f"is corrupt ({text or type(exc).__name__})")


def _upright(image):
    """Apply the EXIF orientation tag, so that a phone photo is trained the way it is viewed."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not a reason to lose the image
        return image


def to_rgb(image):
    """The image in mode RGB: transparency composited on white, 16-bit and float scaled to 8-bit."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA" if (mode == "PA" or "transparency" in image.info) else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8bit(image)
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "RGBX"):
        if mode in ("La", "RGBa"):  # premultiplied alpha: undo it first
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        if mode == "RGBX":
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_8bit(image):
    """16-bit, 32-bit integer and float single-channel images to "L"."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image)
    if values.dtype.kind == "f":
        values = np.nan_to_num(values.astype(np.float64))
        top = float(values.max()) if values.size else 0.0
        scaled = values * 255.0 if 0.0 <= float(values.min(initial=0.0)) and top <= 1.0 else values
    else:
        values = values.astype(np.int64)
        low, top = int(values.min(initial=0)), int(values.max(initial=0))
        if low >= 0 and top <= 255 and image.mode == "I":
            scaled = values  # 8-bit data stored in a 32-bit container
        elif low >= 0 and top <= 65535:
            scaled = values / 257.0  # 0..65535 onto 0..255
        else:
            scaled = (values - low) * (255.0 / max(1, top - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(ref: Any, base_dir: str | Path | None = None):
    """Decode the image `ref` points to as an upright RGB PIL image, or raise `ImageError`.

    `ref` may be a PIL image, bytes, a `{"bytes": ..., "path": ...}` dict, a path (relative paths are
    resolved against `base_dir`, the dataset file's folder) or a base64 `data:` URI.
    """
    subject = describe_image_ref(ref)
    base = Path(base_dir) if base_dir is not None else None
    image = _decode(_raw_source(ref, base, subject), subject)
    try:
        return to_rgb(_upright(image))
    except (ValueError, OSError) as exc:  # a colour mode Pillow cannot turn into RGB (e.g. LAB)
        raise ImageError(subject, f"has colour mode {image.mode}, which cannot be converted to RGB ({exc})") from None


# -- size rules ---------------------------------------------------------------------------------


def check_image_size(width: int, height: int, rules: ImageRules, subject: str = "image") -> None:
    """Raise `ImageError` if the family's vision tower cannot take an image of this size."""
    if min(width, height) < rules.min_edge:
        raise ImageError(
            subject,
            f"is {width}x{height} pixels, smaller than the {rules.min_edge}-pixel side this model needs",
        )
    ratio = max(width, height) / min(width, height)
    if rules.max_aspect_ratio is not None and ratio > rules.max_aspect_ratio:
        raise ImageError(
            subject,
            f"is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1, more than the "
            f"{rules.max_aspect_ratio:g}:1 this model accepts",
        )


def _snap(value: float, multiple: int, rounding) -> int:
    return max(multiple, int(rounding(value / multiple)) * multiple)


def fit_pixel_budget(width: int, height: int, rules: ImageRules) -> tuple[int, int]:
    """The (width, height) an image is trained at.

    The image is scaled, aspect ratio kept, so that `min_pixels <= w * h <= max_pixels` (unchanged
    when it already fits), and each side is snapped to a multiple of `patch_multiple`, never below
    one multiple. Snapping rounds to the nearest multiple, or down (up) where the nearest would
    break the maximum (minimum); each side then stays within one multiple of the exactly scaled
    size. Where both bounds cannot hold (an image so elongated that one side is pinned at one
    multiple), the maximum wins: memory is the harder limit.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"an image has positive sides, got {width}x{height}")
    p = rules.patch_multiple
    pixels = width * height
    scale = 1.0
    if pixels > rules.max_pixels:
        scale = math.sqrt(rules.max_pixels / pixels)
    elif pixels < rules.min_pixels:
        scale = math.sqrt(rules.min_pixels / pixels)
    w, h = width * scale, height * scale
    sw, sh = _snap(w, p, round), _snap(h, p, round)
    if sw * sh > rules.max_pixels:
        sw, sh = _snap(w, p, math.floor), _snap(h, p, math.floor)
    elif sw * sh < rules.min_pixels:
        sw, sh = _snap(w, p, math.ceil), _snap(h, p, math.ceil)
    while sw * sh > rules.max_pixels and max(sw, sh) > p:
        if sw >= sh:
            sw -= p
        else:
            sh -= p
    return sw, sh


def resize_to_budget(image, rules: ImageRules):
    """`image` (RGB) resized to `fit_pixel_budget` of its size; the same object when it already fits."""
    from PIL import Image

    size = fit_pixel_budget(image.width, image.height, rules)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def prepare_image(ref: Any, rules: ImageRules, base_dir: str | Path | None = None) -> PreparedImage:
    """Open, check and resize one image; raises `ImageError` saying what is wrong with it."""
    subject = describe_image_ref(ref)
    image = open_image(ref, base_dir)
    check_image_size(image.width, image.height, rules, subject)
    resized = resize_to_budget(image, rules)
    return PreparedImage(image=resized, original_size=image.size, size=resized.size, subject=subject)


# -- the budget a run uses ----------------------------------------------------------------------


def rules_with_budget(rules: ImageRules, *, max_pixels: int | None = None, min_pixels: int | None = None) -> ImageRules:
    """`rules` with the pixel budget overridden where a value is given (None keeps the family's).

    Raises `DataError` when the budget cannot hold one image of one patch, or is inverted.
    """
    new_max = rules.max_pixels if max_pixels is None else int(max_pixels)
    new_min = rules.min_pixels if min_pixels is None else int(min_pixels)
    one_patch = rules.patch_multiple * rules.patch_multiple
    if new_max < one_patch:
        raise DataError(
            f"data.max_pixels = {new_max:,} is smaller than one image patch "
            f"({rules.patch_multiple}x{rules.patch_multiple} = {one_patch:,} pixels) of this model",
            where="data.max_pixels",
            hint=f"Set data.max_pixels to at least {one_patch:,}, or remove it to use the model's default ({rules.max_pixels:,})",
        )
    if new_min > new_max:
        raise DataError(
            f"data.min_pixels = {new_min:,} is larger than data.max_pixels = {new_max:,}",
            where="data.min_pixels",
            hint="Lower data.min_pixels or raise data.max_pixels (remove either to use the model's default)",
        )
    return replace(rules, max_pixels=new_max, min_pixels=new_min)


def effective_image_rules(family_rules: ImageRules, data_section: Any) -> ImageRules:
    """The rules a run applies: the family's, with the preset's `data.max_pixels`/`data.min_pixels`."""
    return rules_with_budget(
        family_rules,
        max_pixels=getattr(data_section, "max_pixels", None),
        min_pixels=getattr(data_section, "min_pixels", None),
    )


# Rules for checking image data when no vision model's own rules are at hand (a data check before a
# model is chosen): the commonest grid (14-pixel patches merged 2x2, as in Qwen2-VL), a budget of
# about 0.8 megapixels, and Qwen's 200:1 aspect limit. A run always uses its family's rules.
GENERIC_IMAGE_RULES = ImageRules(
    patch_multiple=28, min_edge=28, max_pixels=1024 * 28 * 28, min_pixels=4 * 28 * 28, max_aspect_ratio=200.0
)
