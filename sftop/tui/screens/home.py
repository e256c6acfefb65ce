"""Home: the GPUs, recent runs and saved presets, with keys to start, re-run or attach."""

from __future__ import annotations

import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.coordinate import Coordinate
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import get_current_worker

from sftop.engine.presets import list_presets
from sftop.engine.runs import list_runs
from sftop.tui.messages import GpuRead, RunsRead
from sftop.tui.widgets.gpu_panel import GpuPanel
from sftop.tui.widgets.runs_table import RunsTable
from sftop.tui.app_ref import sftop_app

_RECENT = 8


class HomeScreen(Screen):
    CSS_PATH = "home.tcss"
    BINDINGS = [
        Binding("n", "app.new_run", "New run"),
        Binding("r", "rerun", "Re-run preset"),
        Binding("a", "attach", "Attach"),
        Binding("R", "app.runs", "All runs"),
        Binding("q", "app.request_quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="home"):
            yield GpuPanel(id="gpus")
            yield RunsTable(id="recent-runs")
            yield Static(
                "No runs yet. Press n to start one (the demo trains on a CPU in about a minute).", id="no-runs"
            )
            yield DataTable(id="presets", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "sftop"
        self.sub_title = "fine-tune from the terminal"
        self.query_one("#gpus").border_title = "GPUs"
        self.query_one("#recent-runs").border_title = "Recent runs (a: attach, R: all runs)"
        presets = self.query_one("#presets", DataTable)
        presets.border_title = "Presets (r: re-run, n: new run)"
        self.load_presets()
        self.refresh_runs()
        self.watch_gpus()
        self.set_interval(2.0, self.refresh_runs)

    def on_screen_resume(self) -> None:
        self.load_presets()
        self.refresh_runs()

    def load_presets(self) -> None:
        """The presets, the description cut to the table's width: a wider row would add a
        horizontal scrollbar (a lone glyph, and one row fewer) in an 80-column terminal."""
        table = self.query_one("#presets", DataTable)
        presets = list_presets()
        cursor = table.cursor_row
        table.clear(columns=True)
        name_width = max((len(info.name) for info in presets), default=10)
        width = table.scrollable_content_region.width or 78  # inside the border and the vertical scrollbar
        description_width = max(10, width - name_width - 8 - 2 * 3)
        table.add_column("preset", key="name", width=name_width)
        table.add_column("from", key="origin", width=8)
        table.add_column("description", key="description", width=description_width)
        for info in presets:
            description = info.description
            if len(description) > description_width:
                description = description[: description_width - 1] + "…"
            table.add_row(info.name, info.origin, description, key=info.name)
        if cursor and cursor < table.row_count:
            table.move_cursor(row=cursor)
        self._presets_width = width

    def on_resize(self) -> None:
        self.call_after_refresh(self._fit_presets)

    def _fit_presets(self) -> None:
        table = self.query_one("#presets", DataTable)
        if (table.scrollable_content_region.width or 78) != getattr(self, "_presets_width", None):
            self.load_presets()

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs", description="list runs")
    def refresh_runs(self) -> None:
        self.post_message(RunsRead(list_runs()[:_RECENT]))

    @work(thread=True, exclusive=True, exit_on_error=False, group="gpus", description="sample GPUs")
    def watch_gpus(self) -> None:
        worker = get_current_worker()
        services = sftop_app(self).services
        while not worker.is_cancelled:
            self.post_message(GpuRead(services.gpu_reader()))
            deadline = time.monotonic() + max(services.gpu_interval, 2.0)
            while time.monotonic() < deadline and not worker.is_cancelled:
                time.sleep(0.05)

    @on(RunsRead)
    def on_runs(self, message: RunsRead) -> None:
        table = self.query_one("#recent-runs", RunsTable)
        table.show(message.runs)
        table.display = bool(message.runs)
        self.query_one("#no-runs").display = not message.runs

    @on(GpuRead)
    def on_gpu(self, message: GpuRead) -> None:
        self.query_one("#gpus", GpuPanel).show(message.status)

    @on(DataTable.RowSelected, "#recent-runs")
    def on_run_selected(self, event: DataTable.RowSelected) -> None:
        self.action_attach()

    @on(DataTable.RowSelected, "#presets")
    def on_preset_selected(self, event: DataTable.RowSelected) -> None:
        self.action_rerun()

    def action_attach(self) -> None:
        run = self.query_one("#recent-runs", RunsTable).selected
        if run is None:
            self.notify("No run to attach to yet: press n to start one", severity="warning")
            return
        sftop_app(self).attach(run.run)

    def action_rerun(self) -> None:
        table = self.query_one("#presets", DataTable)
        if table.row_count == 0:
            return
        name = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
        sftop_app(self).new_run(preset=name, jump_to_plan=True)
