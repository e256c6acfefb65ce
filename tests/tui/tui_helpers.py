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
    console = Console(width=400, file=io.StringIO(), record=True,
                      color_system=None)
    console.print(content)
    return console.export_text()
