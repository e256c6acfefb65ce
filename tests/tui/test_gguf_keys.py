"""Where the TUI offers the GGUF export: `g` on the runs screen and on a finished run's dashboard."""

from tui_fixtures import mark_alive, recorded_run
from tui_helpers import notices, text_of, wait_until

from sftop.tui.app import SftopApp
from sftop.tui.screens.dashboard import DashboardScreen
from sftop.tui.screens.gguf_export import GgufExportScreen
from sftop.tui.screens.runs import RunsScreen
from sftop.tui.widgets.runs_table import RunsTable


async def test_runs_screen_opens_the_gguf_export_for_a_run_with_an_adapter(services):
    run = recorded_run("tolocal")
    run.adapter.mkdir()
    app = SftopApp(start="runs", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one("#runs", RunsTable).row_count == 1,
        )
        await pilot.press("g")
        await wait_until(pilot, lambda: isinstance(app.screen, GgufExportScreen))
        assert text_of(app, "#dialog-title") == f"Export {run.name} to GGUF"
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen))


async def test_runs_screen_says_when_there_is_nothing_to_export(services):
    recorded_run("fresh")
    app = SftopApp(start="runs", services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one("#runs", RunsTable).row_count == 1,
        )
        await pilot.press("g")
        await wait_until(pilot, lambda: any("no adapter or checkpoint" in m for m in notices(app, "warning")))
        assert isinstance(app.screen, RunsScreen)


async def test_dashboard_offers_gguf_only_once_the_run_has_finished(services):
    running = recorded_run("busy", steps=3, total=60, finished=False)
    mark_alive(running)
    app = SftopApp(start="dashboard", run=running, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed)
        await pilot.press("g")
        await wait_until(pilot, lambda: any("once it has finished" in m for m in notices(app, "warning")))
        assert isinstance(app.screen, DashboardScreen)

    done = recorded_run("done")
    app = SftopApp(start="dashboard", run=done, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed)
        await pilot.press("g")
        await wait_until(pilot, lambda: isinstance(app.screen, GgufExportScreen))
