"""The row-level image stage: open, check and resize every image of every row, before any GPU time.

`load_row_images(conv, base_dir, rules)` does one row: each `ImagePart` of the normalised
conversation is opened (`images.prepare_image`), checked against the family's `ImageRules` and
resized to the pixel budget; the first image that fails makes the row a bad row, raising
`RowError` with a reason such as "image 2: file photos/x.jpg is truncated".
`check_rows_images` does it for a whole dataset, recording bad rows in a `ValidationReport`
(skipped and counted; the caller decides with `raise_if_too_many` whether a run may go on), and
keeps each good row's image sizes so that token counts and statistics need no second decode.
`ImageStats` summarises them for `sftop data check` and the TUI.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sftop.engine.data.conversation import Conversation, ImagePart, Message, Part
from sftop.engine.data.formats import RowError
from sftop.engine.data.images import ImageError, ImageRules, PreparedImage, prepare_image
from sftop.engine.data.validate import ValidationReport
from sftop.engine.data.vision_rows import dataset_base_dir

Size = tuple[int, int]  # (width, height)


@dataclass
class ImagedRow:
    """One row after the image stage: the conversation with every `ImagePart.image` an RGB PIL image
    at its final size, and what each image was before."""

    conversation: Conversation
    images: list[PreparedImage]

    @property
    def sizes(self) -> list[tuple[Size, Size]]:
        return [(p.original_size, p.size) for p in self.images]


def load_row_images(conv: Conversation, base_dir: str | Path | None, rules: ImageRules) -> ImagedRow:
    """Open, check and resize every image of `conv`; raises `RowError` naming the first bad one."""
    prepared: list[PreparedImage] = []
    messages = []
    for message in conv.messages:
        content: list[Part] = []
        for part in message.content:
            if isinstance(part, ImagePart):
                try:
                    image = prepare_image(part.image, rules, base_dir)
                except ImageError as exc:
                    raise RowError(f"image {len(prepared) + 1}: {exc}") from None
                prepared.append(image)
                content.append(ImagePart(image.image))
            else:
                content.append(part)
        messages.append(Message(message.role, tuple(content)))
    resolved = Conversation(messages=tuple(messages), document=conv.document, source_index=conv.source_index)
    return ImagedRow(resolved, prepared)


def resolve_row_images(conv: Conversation, base_dir: str | Path | None, rules: ImageRules) -> Conversation:
    """`conv` with each `ImagePart.image` replaced by the final RGB PIL image; raises `RowError`."""
    return load_row_images(conv, base_dir, rules).conversation


@dataclass
class ImageCheck:
    """The rows that passed the image stage, in order, with each row's (original, final) sizes."""

    conversations: list[Conversation] = field(default_factory=list)
    sizes: list[list[tuple[Size, Size]]] = field(default_factory=list)


PARALLEL_MIN_ROWS = 64


def check_rows_images(
    conversations: Sequence[Conversation],
    base_dir: str | Path | None,
    rules: ImageRules,
    report: ValidationReport,
    *,
    keep_images: bool = False,
    workers: int | None = None,
) -> ImageCheck:
    """Run the image stage over every row; bad rows go into `report` and are left out.

    With `keep_images`, the kept conversations hold the decoded, resized images (memory: width x
    height x 3 bytes each); without, they keep their original references, to be resolved again
    when batches are built (`resolve_row_images`), and only the sizes are kept.
    Rows without images pass through unchanged.
    """

    def one(conv: Conversation) -> ImagedRow | RowError:
        if not any(isinstance(p, ImagePart) for m in conv.messages for p in m.content):
            return ImagedRow(conv, [])
        try:
            return load_row_images(conv, base_dir, rules)
        except RowError as exc:
            return exc

    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(conversations) >= PARALLEL_MIN_ROWS else 1
    if workers > 1:
        # Pillow releases the GIL while decoding and resizing, so threads overlap well.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outcomes = pool.map(one, conversations)
            result = _collect(conversations, outcomes, report, keep_images)
    else:
        result = _collect(conversations, map(one, conversations), report, keep_images)
    return result


def check_structured_images(structured, rules: ImageRules, *, keep_images: bool = False) -> ImageCheck:
    """The image stage over the rows of `prepare.validate_structure(..., allow_images=True)`.

    Bad rows join `structured.report`; `structured.conversations` keeps only the good ones. Call
    `structured.report.raise_if_too_many(data.max_bad_fraction)` afterwards to stop a run that
    has too many bad rows.
    """
    base_dir = dataset_base_dir(structured.raw.source, structured.raw.kind)
    check = check_rows_images(structured.conversations, base_dir, rules, structured.report, keep_images=keep_images)
    structured.conversations = check.conversations
    return check


def validate_image_rows(section, family_rules: ImageRules, *, keep_images: bool = False, strict: bool = True):
    """A vision run's data stage before tokenisation, in one call: read `data.source`, normalise and
    check every row's structure and images against the family's rules with the preset's pixel
    budget (`data.max_pixels` / `data.min_pixels`).

    Returns `(structured, check)`: `structured.conversations` holds the good rows (their images
    still references unless `keep_images`), `check.sizes` each one's (original, final) image sizes.
    With `strict`, raises `DataError` when more than `data.max_bad_fraction` of the rows are bad.
    """
    from sftop.engine.data.images import effective_image_rules
    from sftop.engine.data.prepare import validate_structure

    rules = effective_image_rules(family_rules, section)
    structured = validate_structure(section, strict=False, allow_images=True)
    check = check_structured_images(structured, rules, keep_images=keep_images)
    if strict:
        structured.report.raise_if_too_many(section.max_bad_fraction)
    return structured, check


def _collect(conversations, outcomes, report: ValidationReport, keep_images: bool) -> ImageCheck:
    result = ImageCheck()
    for conv, outcome in zip(conversations, outcomes):
        if isinstance(outcome, RowError):
            report.add(conv.source_index, str(outcome))
            continue
        result.conversations.append(outcome.conversation if keep_images else conv)
        result.sizes.append(outcome.sizes)
    return result


# -- statistics ---------------------------------------------------------------------------------


def _nearest_rank(values: list[int], q: float) -> int:
    if not values:
        return 0
    values = sorted(values)
    rank = max(1, -(-len(values) * q // 100))
    return values[int(rank) - 1]


@dataclass
class SizeSummary:
    """Widths, heights and pixel counts of a set of images: smallest, median, largest."""

    count: int = 0
    width: tuple[int, int, int] = (0, 0, 0)  # min, p50, max
    height: tuple[int, int, int] = (0, 0, 0)
    pixels: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, sizes: list[Size]) -> "SizeSummary":
        if not sizes:
            return cls()

        def three(values: list[int]) -> tuple[int, int, int]:
            return (min(values), _nearest_rank(values, 50), max(values))

        return cls(
            count=len(sizes),
            width=three([w for w, _ in sizes]),
            height=three([h for _, h in sizes]),
            pixels=three([w * h for w, h in sizes]),
        )

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "width": list(self.width),
            "height": list(self.height),
            "pixels": list(self.pixels),
        }


@dataclass
class ImageStats:
    """What `sftop data check` shows about a dataset's images."""

    rules: ImageRules
    rows: int  # usable rows
    rows_with_images: int
    images: int
    images_per_row: dict[int, int]  # images in a row -> how many rows
    original: SizeSummary
    final: SizeSummary
    resized: int  # images whose size the pixel budget changed
    # Set only when a vision model's exact count was given (`image_tokens(width, height)`):
    tokens_per_image: tuple[int, int, int] | None = None  # min, p50, max
    image_tokens: int | None = None  # over usable rows
    image_tokens_per_row_p95: int | None = None  # the planner sizes micro-batches with it
    image_tokens_per_row_max: int | None = None
    text_tokens: int = 0

    @property
    def image_token_share(self) -> float | None:
        if self.image_tokens is None:
            return None
        total = self.image_tokens + self.text_tokens
        return self.image_tokens / total if total else 0.0

    @classmethod
    def build(
        cls,
        sizes: list[list[tuple[Size, Size]]],
        rules: ImageRules,
        *,
        text_tokens: int = 0,
        image_tokens: Callable[[int, int], int] | None = None,
    ) -> "ImageStats":
        flat = [pair for row in sizes for pair in row]
        stats = cls(
            rules=rules,
            rows=len(sizes),
            rows_with_images=sum(1 for row in sizes if row),
            images=len(flat),
            images_per_row=dict(sorted(Counter(len(row) for row in sizes).items())),
            original=SizeSummary.of([o for o, _ in flat]),
            final=SizeSummary.of([f for _, f in flat]),
            resized=sum(1 for o, f in flat if o != f),
            text_tokens=text_tokens,
        )
        if image_tokens is not None:
            cache: dict[Size, int] = {}

            def count(size: Size) -> int:
                if size not in cache:
                    cache[size] = int(image_tokens(*size))
                return cache[size]

            per_image = [count(f) for _, f in flat]
            per_row = [sum(count(f) for _, f in row) for row in sizes]
            stats.tokens_per_image = (
                (min(per_image), _nearest_rank(per_image, 50), max(per_image)) if per_image else (0, 0, 0)
            )
            stats.image_tokens = sum(per_row)
            stats.image_tokens_per_row_p95 = _nearest_rank(per_row, 95)
            stats.image_tokens_per_row_max = max(per_row, default=0)
        return stats

    def to_dict(self) -> dict:
        share = self.image_token_share
        return {
            "rows_with_images": self.rows_with_images,
            "images": self.images,
            "images_per_row": {str(k): v for k, v in self.images_per_row.items()},
            "original_size": self.original.to_dict(),
            "final_size": self.final.to_dict(),
            "resized": self.resized,
            "rules": {
                "patch_multiple": self.rules.patch_multiple,
                "min_edge": self.rules.min_edge,
                "min_pixels": self.rules.min_pixels,
                "max_pixels": self.rules.max_pixels,
                "max_aspect_ratio": self.rules.max_aspect_ratio,
            },
            "tokens_per_image": list(self.tokens_per_image) if self.tokens_per_image else None,
            "image_tokens": self.image_tokens,
            "image_tokens_per_row_p95": self.image_tokens_per_row_p95,
            "image_tokens_per_row_max": self.image_tokens_per_row_max,
            "image_token_share": round(share, 4) if share is not None else None,
        }
