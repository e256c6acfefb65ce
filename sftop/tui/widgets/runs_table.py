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
    "running": "bold green",
    "starting": "green",
    "stopping": "yellow",
    "finished": "green",
    "stopped": "yellow",
    "failed": "bold red",
    "lost": "red",
    "unknown": "dim",
}


class RunsTable(DataTable):
    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self.summaries: dict[str, RunSummary] = {}

    def on_mount(self) -> None:
        self._layout_width = 0
        self._runs: list[RunSummary] = []
        self._add_columns(self._width())

    def _width(self) -> int:
        # The region inside the border and the vertical scrollbar.
        return max(40, self.scrollable_content_region.width or self.size.width or 78)

    def _add_columns(self, width: int) -> None:
        """Fixed widths (a table that re-measures itself on every refresh jitters while runs
        update), chosen for the terminal's width: the run and model columns share what the others
        leave, so nothing scrolls sideways; "started" only where there is room, since a run's name
        begins with its start time anyway."""
        self._layout_width = width
        names = max((len(r.name) for r in self._runs), default=26)
        models = max((len(short_model(r.model or "?")) for r in self._runs), default=20)
        started = width >= 100
        self.step_width = max([4] + [len(r.progress) for r in self._runs])
        fixed = 8 + self.step_width + 6 + (11 if started else 0)
        columns = 5 + (1 if started else 0)
        free = width - fixed - 2 * columns  # each cell has one column of padding on each side
        if names + models <= free:
            model_width = free - names
        else:  # the run's name is what `sftop attach` takes: it keeps priority, the model keeps 14
            model_width = max(min(models, 14), free - names)
        self.run_width, self.model_width = max(12, free - model_width), max(8, model_width)
        self.add_column("run", key="run", width=self.run_width)
        self.add_column("status", key="status", width=8)
        self.add_column("step", key="step", width=self.step_width)
        self.add_column("loss", key="loss", width=6)
        if started:
            self.add_column("started", key="started", width=11)
        self.add_column("model", key="model", width=self.model_width)

    def on_resize(self) -> None:
        if self._width() != self._layout_width:
            self.show(self._runs)

    def show(self, runs: list[RunSummary]) -> None:
        selected = self.selected
        self.summaries = {r.name: r for r in runs}
        self._runs = list(runs)
        self.clear(columns=True)
        self._add_columns(self._width())
        started_shown = "started" in self.columns
        for r in runs:
            loss = r.final_loss if r.final_loss is not None else r.loss
            cells = [
                clip(r.name, self.run_width),
                Text(r.status, style=STATUS_STYLE.get(r.status, "")),
                r.progress,
                format_number(loss),
            ]
            if started_shown:
                cells.append(time.strftime("%m-%d %H:%M", time.localtime(r.started)) if r.started else "-")
            model = r.model or "?"
            cells.append(model if len(model) <= self.model_width else clip(short_model(model), self.model_width))
            self.add_row(*cells, key=r.name)
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


def short_model(name: str) -> str:
    """A hub id without its organisation (Qwen/Qwen2.5-1.5B-Instruct -> Qwen2.5-1.5B-Instruct)."""
    return name.rsplit("/", 1)[-1] if "/" in name and not name.startswith(("/", ".", "~")) else name


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
