from tui_helpers import notices, run_from_palette, text_of, wait_until
from tui_fixtures import T0, mark_alive, recorded_run

from sftop.tui.app import SftopApp
from sftop.tui.screens.confirm import ConfirmScreen
from sftop.tui.screens.dashboard import DashboardScreen
from sftop.tui.screens.home import HomeScreen
from sftop.tui.screens.runs import RunsScreen
from sftop.tui.widgets.runs_table import RunsTable


async def test_empty_state_says_no_gpu_and_no_runs(no_gpu_services):
    app = SftopApp(services=no_gpu_services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen) and app.screen.query_one("#no-runs").display)
        await wait_until(pilot, lambda: "No GPU" in text_of(app, "#gpus"))
        assert "NVML not found: no NVIDIA driver is installed" in text_of(app, "#gpus")
        assert "No runs yet" in text_of(app, "#no-runs")
        assert not app.screen.query_one("#recent-runs").display
        await pilot.press("a")  # nothing to attach to: says so, stays home
        assert isinstance(app.screen, HomeScreen)
        await wait_until(pilot, lambda: any("No run to attach" in n for n in notices(app)))


async def test_gpu_unavailable_reason_is_shown(services):
    from sftop.engine.gpu import GpuStatus

    reason = "nvidia-ml-py is not installed (No module named 'pynvml'): run `pip install nvidia-ml-py`"
    services.gpu_reader = lambda: GpuStatus(gpus=[], reason=reason)
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: "No GPU" in text_of(app, "#gpus"))
        assert "nvidia-ml-py is not installed" in text_of(app, "#gpus")


async def test_home_lists_runs_and_presets_and_attaches(services):
    old = recorded_run("old", when=T0)
    new = recorded_run("new", when=T0 + 3600)
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        table = await wait_until(
            pilot,
            lambda: (
                app.screen.query_one("#recent-runs", RunsTable).row_count == 2
                and app.screen.query_one("#recent-runs", RunsTable)
            ),
        )
        assert [r.name for r in table.summaries.values()] == [new.name, old.name]
        assert "NVIDIA H100 80GB HBM3" in text_of(app, "#gpus") and "20.0/80.0 GiB" in text_of(app, "#gpus")
        presets = app.screen.query_one("#presets")
        assert presets.row_count >= 5 and presets.get_row_at(0)[0] == "demo"
        await pilot.press("down", "a")  # second row: the older run
        screen = await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen)
        assert screen.run == old


async def test_runs_screen_inspects_a_run(services):
    recorded_run("inspectme")
    app = SftopApp(start="runs", services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one("#runs", RunsTable).row_count == 1,
        )
        await pilot.press("i")
        await wait_until(pilot, lambda: len(app.screen.query("#dialog-body")) == 1)
        body = text_of(app, "#dialog-body")
        assert "status      finished" in body and "step        60/60" in body and 'name = "inspectme"' in body
        await pilot.press("escape", "u")  # a finished run is not resumed: it says how to re-run instead
        await wait_until(pilot, lambda: any("has finished" in n for n in notices(app, "warning")))
        assert isinstance(app.screen, RunsScreen)


async def test_quit_dialog_says_training_continues(services):
    run = recorded_run("bg", steps=3, total=60, finished=False)
    mark_alive(run)
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))
        await pilot.press("q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        body = text_of(app, "#dialog-body")
        assert "Training continues in the background (1 running" in body
        assert f"sftop attach {run.name}" in body
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))
        await pilot.press("q")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: app.return_code == 0 or not app.is_running)


async def test_command_palette_attaches_to_a_run(services):
    run = recorded_run("palette")
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))
        await run_from_palette(pilot, "attach palette", f"Attach {run.name}")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen)
        assert screen.run == run


async def test_command_palette_offers_export_for_a_run_with_an_adapter(services):
    run = recorded_run("exportable")
    run.adapter.mkdir()  # empty: export refuses it, and says so
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))
        await run_from_palette(pilot, "export exportable", f"Export {run.name}")
        await wait_until(pilot, lambda: any(f"Exporting {run.name}…" in n for n in notices(app)))
        await wait_until(pilot, lambda: any("no adapter" in n for n in notices(app, "error")), timeout=30)


async def test_runs_screen_exports_and_stops_through_the_app_actions(services):
    # the keys of the runs screen and the palette run the same app-level actions
    done = recorded_run("exportme")
    done.adapter.mkdir()  # empty: export refuses it, and says so
    live = recorded_run("stopme", steps=3, total=60, finished=False, when=T0 + 60)
    mark_alive(live)
    app = SftopApp(start="runs", services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        table = await wait_until(
            pilot,
            lambda: (
                isinstance(app.screen, RunsScreen)
                and (t := app.screen.query_one("#runs", RunsTable)).row_count == 2
                and t
            ),
        )
        assert [r.name for r in table.summaries.values()] == [live.name, done.name]
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # keep training: nothing is signalled
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen))
        assert live.read_status()["status"] == "running"
        await pilot.press("down", "e")
        await wait_until(pilot, lambda: any(f"Exporting {done.name}…" in n for n in notices(app)))
        await wait_until(pilot, lambda: any("no adapter" in n for n in notices(app, "error")), timeout=30)
