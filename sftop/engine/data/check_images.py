"""The image part of `sftop data check`: image statistics, image tokens, and the sample's pictures.

`check.check_data` calls these when the rows carry images. Token counts per image come from the
caller's `image_tokens(width, height) -> int` (a vision family's exact count, with its processor);
without one the check still opens, checks and resizes every image, and says that counting tokens
needs a vision model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sftop.engine.data.conversation import Conversation, ImagePart, Message, TextPart
from sftop.engine.data.formats import RowError
from sftop.engine.data.image_check import ImageCheck, ImageStats, check_structured_images, load_row_images
from sftop.engine.data.images import GENERIC_IMAGE_RULES, ImageRules, effective_image_rules
from sftop.engine.data.prepare import DataStats, Structured
from sftop.engine.data.tokenize import Encoded, Encoder, trained_spans
from sftop.engine.data.vision_rows import count_images, dataset_base_dir, is_image_dataset

ImageTokens = Callable[[int, int], int]
Size = tuple[int, int]


def has_images(structured: Structured) -> bool:
    return is_image_dataset(structured.raw.columns, structured.conversations)


@dataclass
class ImageCheckOutcome:
    rules: ImageRules
    rules_source: str  # "the model's" or a note that generic rules were used
    check: ImageCheck
    sizes_by_row: dict[int, list[tuple[Size, Size]]] = field(default_factory=dict)


def check_images(structured: Structured, section, image_rules: ImageRules | None) -> ImageCheckOutcome:
    """Open, check and resize every image (bad rows join the report); sizes kept per source row."""
    base = image_rules if image_rules is not None else GENERIC_IMAGE_RULES
    rules = effective_image_rules(base, section)
    check = check_structured_images(structured, rules)
    source = "the model's rules" if image_rules is not None else "generic rules: no vision model given"
    by_row = {c.source_index: s for c, s in zip(check.conversations, check.sizes)}
    return ImageCheckOutcome(rules, source, check, by_row)


def drop_over_length(
    encoded: list[Encoded], outcome: ImageCheckOutcome, image_tokens: ImageTokens | None, max_length: int, report
) -> tuple[list[Encoded], dict[int, int]]:
    """Rows whose text and image tokens together exceed `max_length` are bad rows (a run drops them:
    it never truncates through image tokens). Returns the kept rows and each one's image tokens."""
    if image_tokens is None:
        return encoded, {}
    cache: dict[Size, int] = {}

    def count(size: Size) -> int:
        if size not in cache:
            cache[size] = int(image_tokens(*size))
        return cache[size]

    kept, per_row = [], {}
    for row in encoded:
        tokens = sum(count(final) for _, final in outcome.sizes_by_row.get(row.source_index, []))
        total = len(row.input_ids) + tokens
        if total > max_length:
            report.add(
                row.source_index,
                f"{total} tokens with its images ({tokens} image tokens), longer than data.max_length = {max_length}",
            )
            continue
        kept.append(row)
        per_row[row.source_index] = tokens
    return kept, per_row


def stats_with_images(encoded: list[Encoded], image_tokens_per_row: dict[int, int], eval_rows: int = 0) -> DataStats:
    """`DataStats` whose lengths count each row's image tokens too (what the model really sees)."""
    stats = DataStats.from_encoded(encoded, eval_rows=eval_rows)
    if not image_tokens_per_row:
        return stats
    from sftop.engine.data.prepare import _percentile

    lengths = sorted(len(e.input_ids) + image_tokens_per_row.get(e.source_index, 0) for e in encoded)
    stats.tokens = sum(lengths)
    stats.length_p50, stats.length_p90 = _percentile(lengths, 50), _percentile(lengths, 90)
    stats.length_p99, stats.length_max = _percentile(lengths, 99), (lengths[-1] if lengths else 0)
    return stats


def image_stats(encoded: list[Encoded], outcome: ImageCheckOutcome, image_tokens: ImageTokens | None) -> ImageStats:
    sizes = [outcome.sizes_by_row.get(e.source_index, []) for e in encoded]
    text_tokens = sum(len(e.input_ids) for e in encoded)
    return ImageStats.build(sizes, outcome.rules, text_tokens=text_tokens, image_tokens=image_tokens)


def image_label(k: int, original: Size, final: Size) -> str:
    return f"[image {k}: {original[0]}x{original[1]} -> {final[0]}x{final[1]}]"


@dataclass
class ImageSample:
    index: int
    spans: list[tuple[str, bool]]
    images: list  # PIL RGB images at their final size
    sizes: list[tuple[Size, Size]]


def image_sample(
    structured: Structured, encoded: list[Encoded], outcome: ImageCheckOutcome, tokenizer, section
) -> ImageSample | None:
    """The first usable row with images, rendered through the chat template with each image shown as
    `[image k: WxH -> wxh]` where it sits, plus its pictures."""
    usable = {e.source_index for e in encoded}
    conv = next((c for c in structured.conversations if c.source_index in usable and count_images(c)), None)
    if conv is None:
        return None
    try:
        row = load_row_images(conv, dataset_base_dir(structured.raw.source, structured.raw.kind), outcome.rules)
    except RowError:  # cannot happen for a row that passed the image stage; show no sample then
        return None
    labelled, k = [], 0
    for m in conv.messages:
        parts = []
        for j, p in enumerate(m.content):
            if isinstance(p, ImagePart):
                original, final = row.sizes[k]
                k += 1
                text_follows = j + 1 < len(m.content) and isinstance(m.content[j + 1], TextPart)
                parts.append(TextPart(image_label(k, original, final) + ("\n" if text_follows else "")))
            else:
                parts.append(p)
        labelled.append(Message(m.role, tuple(parts)))
    display = Conversation(messages=tuple(labelled), source_index=conv.source_index)
    try:
        shown = Encoder(tokenizer, loss_on=section.loss_on).encode(display)
    except RowError:
        return None
    return ImageSample(
        conv.source_index,
        trained_spans(tokenizer, shown.input_ids, shown.labels),
        [p.image for p in row.images],
        row.sizes,
    )


# -- text ---------------------------------------------------------------------------------------


def _range(values: tuple[int, int, int]) -> str:
    low, mid, high = values
    return f"{low}" if low == high else f"{low}–{high} (median {mid})"


def histogram_bar(count: int, most: int, width: int = 20) -> str:
    return "█" * max(1, round(width * count / most)) if count else ""


def render_image_lines(stats: ImageStats, rules_source: str, counted: bool) -> list[str]:
    """The image block of the data check, as indented lines."""
    lines = [f"  images    {stats.images:,} in {stats.rows_with_images:,} of {stats.rows:,} usable rows"]
    most = max(stats.images_per_row.values(), default=0)
    for n, rows in stats.images_per_row.items():
        lines.append(f"    {n:>2} per row  {rows:>7,}  {histogram_bar(rows, most)}")
    if stats.images:
        o, f = stats.original, stats.final
        lines.append(f"  size      before: width {_range(o.width)}, height {_range(o.height)}")
        lines.append(
            f"            after:  width {_range(f.width)}, height {_range(f.height)}  ({stats.resized:,} resized)"
        )
        r = stats.rules
        lines.append(
            f"  budget    {r.min_pixels:,}–{r.max_pixels:,} pixels, sides in steps of {r.patch_multiple}"
            f" ({rules_source}; set with data.min_pixels / data.max_pixels)"
        )
    if counted and stats.tokens_per_image is not None:
        low, mid, high = stats.tokens_per_image
        share = stats.image_token_share or 0.0
        lines.append(
            f"  img tok   {_range((low, mid, high))} per image; {share:.1%} of all tokens are image tokens"
            f" (per row p95 {stats.image_tokens_per_row_p95:,}, max {stats.image_tokens_per_row_max:,})"
        )
    else:
        lines.append("  img tok   tokens per image and their share: needs a vision model to count")
    return lines
