"""A braille line chart: several series, a y axis, downsampled to the widget's width.

Each cell holds 2x4 braille dots, so a 60-column chart shows 120 points across. Series
are downsampled (bucket means) before drawing, which keeps a redraw cheap whatever the
history length; the dashboard also limits redraws to about two a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from sftop.tui.run_state import Series, format_number

# Dot bit for (column within cell, row within cell), per the Unicode braille block.
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
_AXIS_WIDTH = 8


@dataclass
class ChartSeries:
    name: str
    data: Series
    color: str


class LineChart(Widget):
    """Call `set_series` with new data, then `refresh()` (the dashboard throttles it)."""

    DEFAULT_CSS = """
    LineChart { height: 1fr; min-height: 4; }
    """

    def __init__(self, *, empty_text: str = "no data yet", id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.series: list[ChartSeries] = []
        self.empty_text = empty_text
        self.last_points = 0  # points drawn in the last render, per series (for tests)
        self._cache: tuple[tuple, Text] | None = None
        self._version = 0

    def set_series(self, series: list[ChartSeries]) -> None:
        self.series = series
        self._version += 1
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        key = (width, height, self._version, tuple(len(s.data) for s in self.series))
        if self._cache and self._cache[0] == key:
            return self._cache[1]
        text = self._draw(width, height)
        self._cache = (key, text)
        return text

    def _draw(self, width: int, height: int) -> Text:
        plot_w, plot_h = width - _AXIS_WIDTH, height - 1
        if plot_w < 4 or plot_h < 2 or not any(len(s.data) for s in self.series):
            return Text(self.empty_text, style="dim", justify="center")
        dots_w, dots_h = plot_w * 2, plot_h * 4
        sampled = [(s, *s.data.downsample(dots_w)) for s in self.series]
        self.last_points = max(len(xs) for _, xs, _ in sampled)
        all_x = [x for _, xs, _ in sampled for x in xs]
        all_y = [y for _, _, ys in sampled for y in ys if math.isfinite(y)]
        if not all_y:
            return Text(self.empty_text, style="dim", justify="center")
        x0, x1 = min(all_x), max(all_x)
        y0, y1 = min(all_y), max(all_y)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
        span_x = (x1 - x0) or 1.0
        bits = [[0] * plot_w for _ in range(plot_h)]
        owner = [[-1] * plot_w for _ in range(plot_h)]

        def plot(col: int, row: int, index: int) -> None:
            cell_r, cell_c = row // 4, col // 2
            bits[cell_r][cell_c] |= _DOTS[col % 2][row % 4]
            owner[cell_r][cell_c] = index

        for index, (_, xs, ys) in enumerate(sampled):
            prev = None
            for x, y in zip(xs, ys):
                if not math.isfinite(y):
                    prev = None
                    continue
                col = round((x - x0) / span_x * (dots_w - 1))
                row = round((y1 - y) / (y1 - y0) * (dots_h - 1))
                if prev is None:
                    plot(col, row, index)
                else:
                    pc, pr = prev
                    steps = max(abs(col - pc), abs(row - pr), 1)
                    for t in range(1, steps + 1):
                        plot(pc + round((col - pc) * t / steps), pr + round((row - pr) * t / steps), index)
                prev = (col, row)

        styles = [Style(color=s.color) for s, _, _ in sampled]
        axis = Style(dim=True)
        text = Text(no_wrap=True, overflow="crop")
        labels = {0: y1, plot_h - 1: y0}
        if plot_h >= 5:
            labels[(plot_h - 1) // 2] = y1 - (y1 - y0) * ((plot_h - 1) // 2) / (plot_h - 1)
        for r in range(plot_h):
            label = format_number(labels[r], 3) if r in labels else ""
            text.append(f"{label:>{_AXIS_WIDTH - 1}}┤" if r in labels else " " * (_AXIS_WIDTH - 1) + "│", axis)
            run: list[str] = []
            run_owner: int | None = None
            for c in range(plot_w):
                ch = chr(0x2800 + bits[r][c]) if bits[r][c] else " "
                who = owner[r][c]
                if who != run_owner and run:
                    text.append("".join(run), styles[run_owner] if run_owner is not None and run_owner >= 0 else None)
                    run = []
                run_owner = who
                run.append(ch)
            if run:
                text.append("".join(run), styles[run_owner] if run_owner is not None and run_owner >= 0 else None)
            text.append("\n")
        left, right = f"{x0:g}", f"{x1:g}"
        gap = max(1, plot_w - len(left) - len(right))
        text.append(" " * (_AXIS_WIDTH - 1) + "└" + left + " " * gap + right, axis)
        return text
