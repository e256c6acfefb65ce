"""Every run in the state dir: attach, inspect, resume, stop or export one."""

from __future__ import annotations

import json

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from sftop.engine.runs import RunSummary, list_runs
from sftop.tui.messages import RunsRead
from sftop.tui.screens.confirm import InfoScreen
from sftop.tui.widgets.runs_table import RunsTable
from sftop.tui.app_ref import sftop_app


def describe_run(summary: RunSummary) -> Text:
    run = summary.run
    text = Text()
    text.append(f"{summary.name}\n", style="bold")
    text.append(f"status      {summary.status}\n")
    text.append(f"step        {summary.progress}\n")
    if summary.final_loss is not None:
        text.append(f"final loss  {summary.final_loss:.4f}\n")
    if summary.reason:
        text.append(f"reason      {summary.reason}\n", style="red")
    text.append(f"directory   {run.path}\n")
    checkpoints = run.complete_checkpoints()
    text.append(f"checkpoints {', '.join(p.name for p in checkpoints) or 'none'}\n")
    text.append(f"adapter     {'yes' if run.adapter.is_dir() else 'not yet'}\n\n")
    status = run.read_status()
    if status:
        text.append("status.json\n", style="bold")
        text.append(json.dumps({k: v for k, v in status.items() if k != "command"}, indent=2) + "\n\n")
    try:
        text.append("preset.toml\n", style="bold")
        text.append(run.preset.read_text(encoding="utf-8"))
    except OSError:
        text.append("(missing)\n")
    return text


class RunsScreen(Screen):
    CSS_PATH = "runs.tcss"
    BINDINGS = [
        Binding("a", "attach", "Attach"),
        Binding("i", "inspect", "Inspect"),
        Binding("u", "resume", "Resume"),
        Binding("s", "stop", "Stop"),
        Binding("e", "export", "Export"),
        Binding("g", "export_gguf", "GGUF"),
        Binding("escape", "app.pop_screen", "Back"),
        Binding("q", "app.request_quit", "Quit", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunsTable(id="runs")
        yield Static("No runs yet. Press escape, then n to start one.", id="no-runs")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "sftop"
        self.sub_title = "runs"
        self.query_one("#runs").border_title = "All runs"
        self.refresh_runs()
        self.set_interval(2.0, self.refresh_runs)

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs", description="list runs")
    def refresh_runs(self) -> None:
        self.post_message(RunsRead(list_runs()))

    @on(RunsRead)
    def on_runs(self, message: RunsRead) -> None:
        table = self.query_one("#runs", RunsTable)
        table.show(message.runs)
        table.display = bool(message.runs)
        self.query_one("#no-runs").display = not message.runs

    @on(DataTable.RowSelected)
    def on_selected(self, event: DataTable.RowSelected) -> None:
        self.action_attach()

    @property
    def selected(self) -> RunSummary | None:
        return self.query_one("#runs", RunsTable).selected

    def action_attach(self) -> None:
        if self.selected:
            sftop_app(self).attach(self.selected.run)

    def action_inspect(self) -> None:
        if self.selected:
            self.app.push_screen(InfoScreen(f"Run {self.selected.name}", describe_run(self.selected)))

    def action_resume(self) -> None:
        run = self.selected
        if run is None:
            return
        if run.active:
            self.notify(f"{run.name} is {run.status}: attach to it instead (a)", severity="warning")
            return
        if run.status == "finished":
            self.notify(f"{run.name} has finished; re-run its preset from home (r) for a new run", severity="warning")
            return
        sftop_app(self).resume_run(run.run)

    def action_stop(self) -> None:
        run = self.selected
        if run is None or not run.active:
            self.notify("That run is not running", severity="warning")
            return
        sftop_app(self).stop_run(run.run, then=self.refresh_runs)

    def action_export(self) -> None:
        run = self.selected
        if run is None:
            return
        if not run.run.adapter.is_dir() and not run.run.complete_checkpoints():
            self.notify(f"{run.name} has no adapter or checkpoint to export yet", severity="warning")
            return
        sftop_app(self).export_run(run.run)

    def action_export_gguf(self) -> None:
        from sftop.tui.screens.gguf_export import GgufExportScreen

        run = self.selected
        if run is None:
            return
        if not run.run.adapter.is_dir() and not run.run.complete_checkpoints():
            self.notify(f"{run.name} has no adapter or checkpoint to export yet", severity="warning")
            return
        self.app.push_screen(GgufExportScreen(run.run))
