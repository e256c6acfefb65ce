"""SVG snapshots of the main screens at 80x24, from fixed runs, a fixed GPU reading and a fixed clock.

Each `run_before` awaits what its screen shows; the snapshot is then taken once the app is idle
and its animations are done (pytest-textual-snapshot waits for both).

Review changes with `pytest tests/tui/test_snapshots.py --snapshot-update` and the HTML report.
"""

import pytest
from tui_helpers import wait_until
from tui_fixtures import T0, mark_alive, recorded_run

from sftop.tui.app import SftopApp
from sftop.tui.screens.confirm import ConfirmScreen
from sftop.tui.screens.dashboard import DashboardScreen
from sftop.tui.screens.home import HomeScreen
from sftop.tui.screens.runs import RunsScreen
from sftop.tui.widgets.runs_table import RunsTable
from sftop.tui.wizard.dataset_step import DatasetStep
from sftop.tui.wizard.model_step import ModelStep
from sftop.tui.wizard.plan_step import PlanStep
from sftop.tui.wizard.screen import WizardScreen


@pytest.fixture(autouse=True)
def steady_cursor(monkeypatch):
    """A blinking cursor would make a snapshot depend on when it was taken."""
    from textual.widgets import Input

    monkeypatch.setattr(Input, "cursor_blink", False)


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def runs_shown(count):
    async def run_before(pilot):
        def ready():
            screen = pilot.app.screen
            if not isinstance(screen, (HomeScreen, RunsScreen)) or screen.query_one(RunsTable).row_count != count:
                return False
            return isinstance(screen, RunsScreen) or "GiB" in str(screen.query_one("#gpus").render())

        await wait_until(pilot, ready)

    return run_before


def test_home(snap_compare, services):
    recorded_run("demo", when=T0)
    failed = recorded_run("qwen-chat", steps=12, total=200, finished=False, status="failed", when=T0 + 7200)
    failed.write_status(status="failed")
    assert snap_compare(SftopApp(services=services), run_before=runs_shown(2))


def test_home_empty_without_gpu(snap_compare, no_gpu_services):
    async def run_before(pilot):
        await wait_until(
            pilot,
            lambda: (
                isinstance(pilot.app.screen, HomeScreen)
                and pilot.app.screen.query_one("#no-runs").display
                and "No GPU" in str(pilot.app.screen.query_one("#gpus").render())
            ),
        )

    assert snap_compare(SftopApp(services=no_gpu_services), run_before=run_before)


def dashboard_ready(pilot):
    screen = pilot.app.screen
    return (
        isinstance(screen, DashboardScreen)
        and screen.replayed
        and screen.process_status is not None
        and "GiB" in str(screen.query_one("#gpus").render())
    )


def test_dashboard_finished(snap_compare, services):
    run = recorded_run("demo")

    async def run_before(pilot):
        await wait_until(pilot, lambda: dashboard_ready(pilot))

    assert snap_compare(SftopApp(start="dashboard", run=run, services=services), run_before=run_before)


def test_dashboard_running(snap_compare, services):
    run = recorded_run("demo", steps=40, total=120, finished=False)
    mark_alive(run)

    async def run_before(pilot):
        await wait_until(pilot, lambda: dashboard_ready(pilot))

    assert snap_compare(SftopApp(start="dashboard", run=run, services=services), run_before=run_before)


def test_runs_screen(snap_compare, services):
    recorded_run("demo", when=T0)
    stopped = recorded_run("stopped-one", steps=30, total=60, finished=False, when=T0 + 60)
    stopped.write_status(status="stopped")
    assert snap_compare(SftopApp(start="runs", services=services), run_before=runs_shown(2))


def test_quit_dialog(snap_compare, services):
    run = recorded_run("bg", steps=3, total=60, finished=False)
    mark_alive(run)

    async def run_before(pilot):
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HomeScreen))
        await pilot.press("q")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))

    assert snap_compare(SftopApp(services=services), run_before=run_before)


def test_wizard_model_step(snap_compare, services):
    async def run_before(pilot):
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, WizardScreen))

        # the HF cache scan fills the model list from a worker; wait until its result is in the list
        step = pilot.app.screen.query_one(ModelStep)
        await wait_until(pilot, lambda: step.cache_scanned)

    assert snap_compare(SftopApp(start="wizard", services=services), run_before=run_before)


def test_wizard_dataset_with_bad_rows(snap_compare, services):
    async def run_before(pilot):
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, WizardScreen))
        await pilot.press("ctrl+n")
        step = pilot.app.screen.query_one(DatasetStep)
        field = pilot.app.screen.query_one("#data-input")
        field.value = "builtin:sample-broken"
        field.focus()
        await pilot.press("enter")
        await wait_until(
            pilot, lambda: step.checked_source == "builtin:sample-broken" and step.result is not None, timeout=120
        )
        await pilot.press("ctrl+n")

    assert snap_compare(SftopApp(start="wizard", services=services), run_before=run_before, terminal_size=(80, 30))


def test_wizard_plan_from_rerun(snap_compare, services):
    async def run_before(pilot):
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, HomeScreen))
        await pilot.press("r")  # re-run the highlighted preset (demo): straight to its plan
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, WizardScreen))
        step = pilot.app.screen.query_one(PlanStep)
        await wait_until(pilot, lambda: step.plan is not None or step.error, timeout=60)

    assert snap_compare(SftopApp(services=services), run_before=run_before)
