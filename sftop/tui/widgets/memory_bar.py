"""Horizontal memory bars: one used/total bar, or stacked segments (the plan's breakdown)."""

from __future__ import annotations

from rich.text import Text

# Thresholds as nvitop uses them: calm below 80 % used, alarming above.
_WARN, _ALERT = 0.80, 0.95


def usage_color(fraction: float) -> str:
    if fraction >= _ALERT:
        return "red"
    if fraction >= _WARN:
        return "yellow"
    return "green"


def usage_bar(used: float | None, total: float | None, width: int) -> Text:
    """`[█████░░░░░]` filled by used/total, coloured by how full it is."""
    width = max(3, width)
    if not used and used != 0 or not total:
        return Text("[" + "?" * (width - 2) + "]", style="dim")
    fraction = max(0.0, min(1.0, used / total))
    inner = width - 2
    filled = round(fraction * inner)
    text = Text("[")
    text.append("█" * filled, style=usage_color(fraction))
    text.append("░" * (inner - filled), style="dim")
    text.append("]")
    return text


def stacked_bar(segments: list[tuple[str, float, str]], total: float, width: int) -> Text:
    """Segments (label, GiB, colour) side by side on a bar of `total` GiB; overflow shows in red."""
    width = max(3, width)
    inner = width - 2
    used = sum(max(0.0, gib) for _, gib, _ in segments)
    scale = max(total, used) or 1.0
    text = Text("[")
    drawn = 0
    for _, gib, color in segments:
        cells = round(max(0.0, gib) / scale * inner)
        cells = min(cells, inner - drawn)
        text.append("█" * cells, style=color)
        drawn += cells
    if used > total:
        text.append("!" * max(0, inner - drawn), style="bold red")
    else:
        text.append("░" * (inner - drawn), style="dim")
    text.append("]")
    return text


def legend(segments: list[tuple[str, float, str]], width: int | None = None) -> Text:
    """`█ label 1.2 GiB  █ ...`; with `width`, lines break between items, never inside one."""
    text = Text()
    column = 0
    for i, (label, gib, color) in enumerate(segments):
        item = f"{label} {gib:.1f} GiB"
        if i:
            if width is not None and column + 2 + 2 + len(item) > width:
                text.append("\n")
                column = 0
            else:
                text.append("  ")
                column += 2
        text.append("█ ", style=color)
        text.append(item)
        column += 2 + len(item)
    return text
