"""A table of runs (status, progress, loss, model), keyed by run name."""

from __future__ import annotations

import time

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist

from sftop.engine.runs import RunSummary
from sftop.tui.run_state import format_number

STATUS_STYLE = {
    "running": "bold green", "starting": "green", "stopping": "yellow", "finished": "green",
    "stopped": "yellow", "failed": "bold red", "lost": "red", "unknown": "dim",
}


class RunsTable(DataTable):
    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self.summaries: dict[str, RunSummary] = {}

    def on_mount(self) -> None:
        # Fixed widths: a table that re-measures itself on every refresh jitters while runs update.
        self.add_column("run", key="run", width=26)
        self.add_column("status", key="status", width=8)
        self.add_column("step", key="step", width=7)
        self.add_column("loss", key="loss", width=6)
        self.add_column("started", key="started", width=11)
        self.add_column("model", key="model", width=30)

    def show(self, runs: list[RunSummary]) -> None:
        selected = self.selected
        self.summaries = {r.name: r for r in runs}
        self.clear()
        for r in runs:
            loss = r.final_loss if r.final_loss is not None else r.loss
            started = time.strftime("%m-%d %H:%M", time.localtime(r.started)) if r.started else "-"
            self.add_row(
                r.name if len(r.name) <= 26 else r.name[:25] + "…",
                Text(r.status, style=STATUS_STYLE.get(r.status, "")),
                r.progress,
                format_number(loss),
                started,
                r.model or "?",
                key=r.name,
            )
        if selected is not None and selected.name in self.summaries:
            self.move_cursor(row=self.get_row_index(selected.name))

    @property
    def selected(self) -> RunSummary | None:
        if not self.summaries or self.cursor_row is None or self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value
        except CellDoesNotExist:
            return None
        return self.summaries.get(key) if key is not None else None
