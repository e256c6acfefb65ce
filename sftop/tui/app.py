"""The sftop Textual app: home, new-run wizard, run dashboard and runs list.

The app never trains: it launches a detached supervisor (sftop.engine.supervisor) and follows
the run's files. Quitting, or losing the terminal, leaves training running.
"""

from __future__ import annotations

from typing import Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import Worker, WorkerState

from sftop.engine.errors import SftopError
from sftop.engine.rundir import RunDir
from sftop.engine.runs import list_runs, stop_run
from sftop.tui.commands import SftopCommands
from sftop.tui.screens.confirm import ConfirmScreen, InfoScreen
from sftop.tui.screens.dashboard import DashboardScreen
from sftop.tui.screens.home import HomeScreen
from sftop.tui.screens.runs import RunsScreen
from sftop.tui.services import Services


class SftopApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "sftop"
    COMMANDS = App.COMMANDS | {SftopCommands}
    BINDINGS = [
        Binding("ctrl+q", "request_quit", "Quit", show=False, priority=True),
        # Over SSH people press ctrl+c to leave; it asks first, and training is never touched.
        Binding("ctrl+c", "request_quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        start: str = "home",
        run: RunDir | None = None,
        preset: str | None = None,
        services: Services | None = None,
    ):
        super().__init__()
        self.start = start
        self.start_run = run
        self.start_preset = preset
        self.services = services or Services()

    def on_mount(self) -> None:
        self.push_screen(HomeScreen())
        if self.start == "dashboard" and self.start_run is not None:
            self.attach(self.start_run)
        elif self.start == "runs":
            self.action_runs()
        elif self.start == "wizard" or self.start_preset:
            self.new_run(preset=self.start_preset)

    # --- navigation used by screens and the command palette -----------------------------------

    def attach(self, run: RunDir) -> None:
        """Open the dashboard on `run`, on top of home (detach returns there)."""
        while len(self.screen_stack) > 2:
            self.pop_screen()
        self.push_screen(DashboardScreen(run))

    def new_run(self, preset: str | None = None, jump_to_plan: bool = False) -> None:
        from sftop.tui.wizard.screen import WizardScreen

        self.push_screen(WizardScreen(preset=preset or "demo", jump_to_plan=jump_to_plan))

    def action_new_run(self) -> None:
        self.new_run()

    def action_runs(self) -> None:
        while len(self.screen_stack) > 2:
            self.pop_screen()
        self.push_screen(RunsScreen())

    def action_attach_latest(self) -> None:
        runs = list_runs()
        if not runs:
            self.notify("No runs yet: start one with n", severity="warning")
            return
        self.attach(runs[0].run)

    def action_detach(self) -> None:
        while len(self.screen_stack) > 2:
            self.pop_screen()

    # --- what can be done to a run: one implementation for the keys of every screen and the palette

    def resume_run(self, run: RunDir) -> None:
        """Relaunch a stopped run from its newest checkpoint and open its dashboard."""
        from sftop.engine.supervisor import launch_run

        try:
            launch_run(run.preset, run, resume=True)
        except SftopError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.attach(run)

    def stop_run(self, run: RunDir, then: Callable[[], object] | None = None) -> None:
        """Ask first; then stop the run (it checkpoints, then exits) off the event loop."""

        def answered(yes: bool | None) -> None:
            if yes:
                self._stop_in_background(run, then)

        self.push_screen(
            ConfirmScreen(
                f"Stop {run.name}?",
                f"The trainer saves a checkpoint first, then exits. Resume later with `sftop resume {run.name}`.",
                yes="Stop",
                no="Keep training",
            ),
            answered,
        )

    @work(thread=True, exit_on_error=False, group="stop", description="stop the run")
    def _stop_in_background(self, run: RunDir, then: Callable[[], None] | None) -> None:
        message = stop_run(run)
        self.call_from_thread(self.notify, message)
        if then is not None:
            self.call_from_thread(then)

    def export_run(self, run: RunDir) -> None:
        """Write the run's LoRA adapter (off the event loop); says where, or why not."""
        self.notify(f"Exporting {run.name}…")
        self._export_in_background(run)

    @work(thread=True, exit_on_error=False, group="export", description="export a run")
    def _export_in_background(self, run: RunDir) -> None:
        from sftop.engine.export import export_run

        try:
            out = export_run(run, merged=False, out=None)
        except SftopError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error", timeout=10)
            return
        self.call_from_thread(self.notify, f"Adapter written to {out}", timeout=10)

    def action_request_quit(self) -> None:
        if isinstance(self.screen, (ConfirmScreen, InfoScreen)):
            return
        active = [r for r in list_runs() if r.active]
        if active:
            names = ", ".join(r.name for r in active[:3]) + (" …" if len(active) > 3 else "")
            body = (
                f"Training continues in the background ({len(active)} running: {names}).\n"
                f"Re-attach later with `sftop attach` (newest run) or `sftop attach {active[0].name}`."
            )
        else:
            body = "No run is training. Past runs stay listed under `sftop runs`."

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit(0)

        self.push_screen(ConfirmScreen("Quit sftop?", body, yes="Quit", no="Stay"), answered)

    # --- errors from workers --------------------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.notify(
                f"{event.worker.description or event.worker.name} failed: {error}", severity="error", timeout=15
            )


def run_app(start: str = "home", run: RunDir | None = None, preset: str | None = None) -> int:
    """Run the TUI until the user quits; training launched from it keeps running afterwards."""
    app = SftopApp(start=start, run=run, preset=preset)
    result = app.run()
    return int(result or 0)
