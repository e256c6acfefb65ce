"""Images in training rows: how big they may be, and the rules a family's vision tower sets.

`ImageRules` is what a vision-language family tells the data layer (see
`sftop.engine.models.vision.family.VisionFamily.image_rules`); the data layer opens, checks and
resizes every image against it before any GPU time is spent.
"""

from __future__ import annotations

from dataclasses import dataclass


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
