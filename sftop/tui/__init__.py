"""The Textual app. Textual is imported only inside this package (the engine stays headless)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftop.engine.rundir import RunDir


def run_app(start: str = "home", run: "RunDir | None" = None, preset: str | None = None) -> int:
    """Open the TUI: `start` is home, dashboard (needs `run`), runs or wizard; `preset` preloads the wizard."""
    from sftop.tui.app import run_app as _run_app

    return _run_app(start=start, run=run, preset=preset)


__all__ = ["run_app"]
