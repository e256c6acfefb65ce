"""Images in the terminal: coloured half-blocks, and the dataset step's image summary.

`HalfBlockImage` draws a PIL image with "▀" characters: each cell shows two pixels, the upper one
as the character's colour and the lower one as its background. It works in every terminal with
true colour or 256 colours (Rich downsamples), through SSH and tmux, with no terminal queries.
"""

from __future__ import annotations

from typing import Any

from rich.color import Color
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

UPPER_HALF = "▀"


class HalfBlockImage:
    """A Rich renderable: `image` scaled (aspect kept) to at most `max_width` x `max_height` cells."""

    def __init__(self, image: Any, max_width: int = 24, max_height: int = 12):
        self.image = image
        self.max_width = max_width
        self.max_height = max_height

    def cells(self, max_width: int | None = None) -> tuple[int, int]:
        """(columns, rows) the image takes; a row holds two pixel rows."""
        width, height = self.image.size
        limit = min(self.max_width, max_width or self.max_width)
        scale = min(limit / width, 2 * self.max_height / height)
        columns = max(1, round(width * scale))
        rows = max(1, round(height * scale / 2))
        return columns, rows

    def pixels(self, columns: int, rows: int) -> list[list[tuple[int, int, int]]]:
        from PIL import Image

        small = self.image.convert("RGB").resize((columns, rows * 2), Image.Resampling.BOX)
        data = list(small.get_flattened_data()) if hasattr(small, "get_flattened_data") else list(small.getdata())
        return [data[y * columns : (y + 1) * columns] for y in range(rows * 2)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        columns, rows = self.cells(options.max_width)
        grid = self.pixels(columns, rows)
        for y in range(rows):
            top, bottom = grid[2 * y], grid[2 * y + 1]
            for upper, lower in zip(top, bottom):
                yield Segment(UPPER_HALF, Style(color=Color.from_rgb(*upper), bgcolor=Color.from_rgb(*lower)))
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        columns, _ = self.cells(options.max_width)
        return Measurement(columns, columns)


def _range(values: tuple[int, int, int]) -> str:
    low, _, high = values
    return f"{low}" if low == high else f"{low}–{high}"


def image_summary(stats: Any, counted: bool) -> Text:
    """Images per row (a small histogram), sizes before -> after the pixel budget, image tokens."""
    text = Text()
    text.append("images ", style="dim")
    text.append(f"{stats.images:,} in {stats.rows_with_images:,} rows")
    text.append("   per row ", style="dim")
    most = max(stats.images_per_row.values(), default=0)
    for n, rows in stats.images_per_row.items():
        bar = "█" * max(1, round(8 * rows / most)) if rows else ""
        text.append(f"{n}:")
        text.append(bar, style="cyan")
        text.append(f"{rows:,} ")
    if stats.images:
        o, f = stats.original, stats.final
        text.append("\nsize ", style="dim")
        text.append(f"{_range(o.width)}x{_range(o.height)} -> {_range(f.width)}x{_range(f.height)} px")
        text.append(f" ({stats.resized:,} resized)", style="dim")
    text.append("   image tokens ", style="dim")
    if counted and stats.tokens_per_image is not None:
        low, mid, high = stats.tokens_per_image
        share = stats.image_token_share or 0.0
        text.append(f"{low}–{high} per image (median {mid}), {share:.0%} of all tokens")
    else:
        text.append("needs a vision model to count", style="yellow")
    return text


def image_captions(sizes: list) -> list[str]:
    return [f"image {k}: {o[0]}x{o[1]} -> {f[0]}x{f[1]}" for k, (o, f) in enumerate(sizes, start=1)]


def sample_beside_images(
    images: list, sizes: list, conversation: Any, *, max_images: int = 2, image_width: int = 24, image_height: int = 10
) -> Table:
    """The sample's images (first `max_images`), each with its sizes, to the left of its masked text."""
    column: list[Any] = []
    for caption, image in list(zip(image_captions(sizes), images))[:max_images]:
        column.append(Text(caption, style="dim"))
        column.append(HalfBlockImage(image, max_width=image_width, max_height=image_height))
    if len(images) > max_images:
        column.append(Text(f"+ {len(images) - max_images} more", style="dim"))
    grid = Table.grid(padding=(0, 2), expand=True)
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    grid.add_row(Group(*column), conversation)
    return grid
