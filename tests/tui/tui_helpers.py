"""Waiting on the app without fixed sleeps: poll a condition while the app runs."""

from __future__ import annotations

import time


async def wait_until(pilot, predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(step)
    raise AssertionError(f"condition not met within {timeout} s")


def text_of(app, selector: str) -> str:
    """The plain text a Static shows (Rich groups and tables too), unwrapped."""
    import io

    from rich.console import Console

    widget = app.screen.query_one(selector)
    content = widget.content
    if isinstance(content, str):
        return content
    # Wide, so that assertions never depend on where a line happened to wrap.
    console = Console(width=400, file=io.StringIO(), record=True, color_system=None)
    console.print(content)
    return console.export_text()


def notices(app, severity: str | None = None) -> list[str]:
    """What the notification toasts on the screen say, as the user reads them; `severity`
    ("information", "warning", "error"): only the toasts drawn in that style."""
    selector = "Toast" if severity is None else f"Toast.-{severity}"
    return [str(toast.render()) for toast in app.screen.query(selector)]


async def run_from_palette(pilot, query: str, expect: str) -> None:
    """Open the command palette, type `query`, wait until its first hit reads `expect`, run it."""
    from textual.command import CommandList, CommandPalette

    app = pilot.app
    await pilot.press("ctrl+p")
    await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette))
    await pilot.press(*query)

    def first_hit() -> str:
        hits = app.screen.query_one(CommandList)
        return str(hits.get_option_at_index(0).prompt) if hits.option_count else ""

    await wait_until(pilot, lambda: expect in first_hit())
    await pilot.press("enter")


def screen_lines(app) -> list[str]:
    """The terminal's lines as the user sees them (plain text, one per row of the screen).

    Textual offers the composed screen publicly only as an SVG screenshot; its compositor's
    strips are the same content as text, so this one helper reads them."""
    return ["".join(segment.text for segment in strip) for strip in app.screen._compositor.render_strips()]
