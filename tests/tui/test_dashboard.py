import time

from tui_helpers import notices, text_of, wait_until
from tui_fixtures import T0, big_history, loss_at, mark_alive, recorded_run, write_events

from sftop.engine.events import Eval, Step
from sftop.tui.app import SftopApp
from sftop.tui.screens.confirm import ConfirmScreen
from sftop.tui.screens.dashboard import DashboardScreen
from sftop.tui.screens.home import HomeScreen
from sftop.tui.widgets.line_chart import LineChart


async def test_recorded_run_shows_loss_step_and_throughput(services):
    run = recorded_run(steps=60, total=60)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        await wait_until(pilot, lambda: "finished" in text_of(app, "#run-status"))
        assert screen.state.step == 60 and len(screen.state.loss) == 60 and len(screen.state.eval_loss) == 3
        assert text_of(app, "#stat-loss") == f"{loss_at(60):.4f}"
        assert text_of(app, "#stat-eval") == f"{loss_at(60) + 0.1:.4f}"
        assert text_of(app, "#stat-tps") == "1.1k"  # 1060 tokens/s at the last step
        assert text_of(app, "#stat-tokens") == "30.7k"
        assert text_of(app, "#stat-ckpt") == "step 60"
        status = text_of(app, "#run-status")
        assert "finished" in status and "step 60/60" in status and "elapsed 1m30s" in status
        assert f"final loss {loss_at(60):.4f}" in status
        # The log tail is read on its own schedule, after the event history: wait for it.
        await wait_until(pilot, lambda: "training" in "\n".join(screen.query_one("#log").lines))
        chart = screen.query_one("#loss-chart", LineChart)
        assert chart.last_points == 60  # fewer points than the chart is wide: drawn as they are


async def test_live_run_updates_as_events_arrive(services):
    run = recorded_run("live", steps=10, total=100, finished=False)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed)
        await wait_until(pilot, lambda: "step 10/100" in text_of(app, "#run-status"))
        assert "running" in text_of(app, "#run-status") and "ETA 2m15s" in text_of(app, "#run-status")
        t = T0 + 20
        write_events(
            run.events,
            [
                {
                    **Step(
                        step=11,
                        epoch=0.11,
                        loss=0.123,
                        learning_rate=1e-3,
                        grad_norm=0.9,
                        tokens_seen=6000,
                        tokens_per_s=2345.0,
                        samples_per_s=4.0,
                        total_steps=100,
                    ).to_dict(),
                    "time": t,
                },
                {**Eval(step=11, eval_loss=0.456).to_dict(), "time": t},
            ],
        )
        await wait_until(pilot, lambda: text_of(app, "#stat-loss") == "0.1230")
        assert text_of(app, "#stat-eval") == "0.4560"
        assert text_of(app, "#stat-tps") == "2.3k"
        assert "step 11/100" in text_of(app, "#run-status")


async def test_checkpoint_key_writes_the_control_file(services):
    run = recorded_run("ckpt", steps=5, total=100, finished=False)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed)
        await wait_until(pilot, lambda: app.screen.process_status == "running")
        await pilot.press("c")
        assert (run.path / "control" / "checkpoint").exists()


async def test_stop_asks_first_and_detach_returns_home(services):
    run = recorded_run("stopme", steps=5, total=100, finished=False)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.process_status)
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "saves a checkpoint first" in text_of(app, "#dialog-body")
        await pilot.press("n")  # keep training: nothing is signalled
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert run.read_status()["status"] == "running"
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))


async def test_finished_run_refuses_checkpoint_and_stop(services):
    run = recorded_run("done")
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed)
        await pilot.press("c", "s")
        await wait_until(
            pilot,
            lambda: (
                any("nothing to checkpoint" in m for m in notices(app, "warning"))
                and any("already finished" in m for m in notices(app, "warning"))
            ),
        )
        assert isinstance(app.screen, DashboardScreen)
        assert not (run.path / "control").exists()


async def test_100k_step_history_is_downsampled_and_stays_responsive(services):
    run = recorded_run("long", steps=0, total=200_000, finished=False)
    big_history(run.events, 100_000)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen, timeout=60
        )
        await wait_until(pilot, lambda: "step 100000/200000" in text_of(app, "#run-status"), timeout=10)
        chart = screen.query_one("#loss-chart", LineChart)
        await wait_until(pilot, lambda: chart.last_points > 0)
        plot_width = chart.content_size.width - 8
        assert len(screen.state.loss) == 100_000
        assert 0 < chart.last_points <= 2 * plot_width  # two braille dots per cell
        started = time.monotonic()
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), timeout=2)
        assert time.monotonic() - started < 2.0
        await pilot.press("n")
        # A redraw of the full chart stays cheap whatever the history.
        started = time.perf_counter()
        for _ in range(5):
            chart._cache = None
            chart.render()
        assert (time.perf_counter() - started) / 5 < 0.1


async def test_failed_run_shows_its_reason_and_how_to_resume(services):
    from sftop.engine.events import RunFailed
    from tui_fixtures import event

    run = recorded_run("broke", steps=35, total=60, finished=False, status="failed")
    write_events(
        run.events,
        [
            event(
                RunFailed(
                    step=35,
                    reason="The trainer was killed by signal SIGKILL",
                    checkpoint=str(run.checkpoints / "checkpoint-30"),
                ),
                T0 + 60,
            )
        ],
    )
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed)
        status = await wait_until(pilot, lambda: "failed" in (s := text_of(app, "#run-status")) and s)
        assert "failed" in status and "step 35/60" in status
        assert f"resume from the last checkpoint: sftop resume {run.name}" in status
        assert "The trainer was killed by signal SIGKILL" in status


async def test_live_warnings_pop_up_and_the_latest_message_is_shown(services):
    from sftop.engine.events import BadStep, PlanChanged
    from tui_fixtures import event

    run = recorded_run("warn", steps=5, total=100, finished=False)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        await pilot.wait_for_scheduled_animations()
        assert not notices(app)  # replayed history is quiet
        write_events(
            run.events,
            [
                event(BadStep(step=6, loss=None, grad_norm=None, consecutive=1), T0 + 10),
                event(PlanChanged(step=6, reason="out of memory at step 6", old={}, new={"micro_batch": 2}), T0 + 11),
            ],
        )
        messages = await wait_until(pilot, lambda: len(notices(app, "warning")) == 2 and notices(app, "warning"))
        assert any("step 6 skipped: loss or gradient not finite" in m for m in messages)
        assert any("plan changed: out of memory at step 6" in m for m in messages)
        assert screen.query_one("#log").border_subtitle == "plan changed: out of memory at step 6"


async def test_plan_is_shown_and_follows_plan_changes(services):
    from sftop.engine.events import PlanChanged, RunStarted
    from tui_fixtures import event

    run = recorded_run("plan", steps=0, total=100, finished=False)
    write_events(
        run.events,
        [
            event(
                RunStarted(
                    run_dir=str(run.path),
                    preset={},
                    environment={},
                    total_steps=100,
                    plan={"micro_batch": 8, "grad_accum": 2, "gradient_checkpointing": "off"},
                ),
                T0 + 1,
            )
        ],
    )
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        await wait_until(pilot, lambda: screen.query_one("#stats").border_title == "plan 8×2 ckpt off")
        write_events(
            run.events,
            [
                event(
                    PlanChanged(
                        step=3,
                        reason="out of memory at step 3",
                        old={},
                        new={"micro_batch": 4, "grad_accum": 4, "gradient_checkpointing": "on"},
                    ),
                    T0 + 5,
                )
            ],
        )
        await wait_until(pilot, lambda: screen.query_one("#stats").border_title == "plan 4×4 ckpt on")


async def test_dashboard_shows_only_the_gpu_the_run_is_pinned_to(services):
    from sftop.engine.gpu import GpuInfo, GpuStatus

    GIB = 2**30

    def card(i, name):
        return GpuInfo(
            index=i,
            nvml_index=i,
            name=name,
            uuid=f"GPU-{i}",
            memory_total_bytes=80 * GIB,
            memory_used_bytes=(10 + i) * GIB,
            memory_free_bytes=(70 - i) * GIB,
            utilization_pct=50,
        )

    services.gpu_reader = lambda: GpuStatus(gpus=[card(0, "H100 zero"), card(1, "H100 one"), card(2, "H100 two")])
    run = recorded_run("pinned", steps=3, total=10, finished=False)
    mark_alive(run)
    run.write_status(cuda_visible_devices="GPU-1")
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and "GiB" in text_of(app, "#gpus"))
        panel = text_of(app, "#gpus")
        assert "H100 one" in panel and "11.0/80.0 GiB" in panel
        assert "H100 zero" not in panel and "H100 two" not in panel


async def test_dashboard_shows_one_bar_per_gpu_of_a_multi_gpu_run(services):
    from sftop.engine.gpu import GpuInfo, GpuStatus

    GIB = 2**30

    def card(i):
        return GpuInfo(
            index=i,
            nvml_index=i,
            name=f"H100 n{i}",
            uuid=f"GPU-{i}",
            memory_total_bytes=80 * GIB,
            memory_used_bytes=(10 + i) * GIB,
            memory_free_bytes=(70 - i) * GIB,
            utilization_pct=50,
        )

    services.gpu_reader = lambda: GpuStatus(gpus=[card(0), card(1), card(2)])
    run = recorded_run("two-gpus", steps=3, total=10, finished=False)
    mark_alive(run)
    run.write_status(cuda_visible_devices="GPU-0,GPU-2", world_size=2)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and "GiB" in text_of(app, "#gpus"))
        panel = text_of(app, "#gpus")
        assert "H100 n0" in panel and "10.0/80.0 GiB" in panel
        assert "H100 n2" in panel and "12.0/80.0 GiB" in panel
        assert "H100 n1" not in panel


async def test_log_pane_follows_the_newest_lines(services):
    run = recorded_run("logtail", steps=10, total=10)
    run.stdout_log.write_text("first line\n", encoding="utf-8")
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        log = await wait_until(pilot, lambda: (lg := screen.query_one("#log")).lines and lg)
        # The log grows while the dashboard is open, as a running trainer's does.
        for i in range(8):
            with run.stdout_log.open("a", encoding="utf-8") as fh:
                fh.write(f"log line {i}\n")
            await wait_until(pilot, lambda i=i: log.lines[-1] == f"log line {i}")
        # The pane is a few rows tall: it must show the end, not stay at the oldest lines.
        await wait_until(pilot, lambda: log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y)


async def test_samples_pane_shows_the_newest_answers_at_80x24(services):
    from sftop.engine.events import Samples

    run = recorded_run("samples", steps=10, total=100, finished=False)
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await wait_until(
            pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen
        )
        pane = screen.query_one("#samples")
        assert not pane.display  # no samples yet: no empty pane taking a line
        write_events(
            run.events,
            [
                {
                    **Samples(
                        step=10,
                        samples=[{"prompt": "What is 5+7?", "answer": "1"}, {"prompt": "What is 3+8?", "answer": "13"}],
                    ).to_dict(),
                    "time": T0 + 20,
                },
            ],
        )
        await wait_until(pilot, lambda: "step 10" in text_of(app, "#samples"))
        write_events(
            run.events,
            [
                {
                    **Samples(
                        step=20,
                        samples=[
                            {"prompt": "What is 5+7?", "answer": "12"},
                            {"prompt": "What is 3+8?", "answer": "11"},
                        ],
                    ).to_dict(),
                    "time": T0 + 30,
                },
            ],
        )
        await wait_until(pilot, lambda: "step 20" in text_of(app, "#samples"))
        await pilot.pause()  # laid out: the pane's region is measured below
        text = text_of(app, "#samples")
        assert "What is 5+7? → 12" in text and "What is 3+8? → 11" in text and "→ 13" not in text
        assert pane.display and pane.region.height <= 2 and pane.region.right <= 80
        assert screen.query_one("#log").region.bottom <= 23  # the log still fits above the footer


async def test_cost_so_far_and_at_the_end_follow_the_price_per_gpu_hour(services):
    run = recorded_run("priced", steps=10, total=100, finished=False, overrides=["plan.price_per_gpu_hour=3.0"])
    mark_alive(run)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "step 10/100" in text_of(app, "#run-status"))
        status = text_of(app, "#run-status")
        # 2m00s elapsed at 3.00 an hour = 0.10; 2m15s to go at the recent pace: 4m15s = 0.21
        assert "ETA 2m15s" in status and "cost 0.10 of ≈0.21" in status
        assert app.screen.query_one("#run-status").region.right <= 80

    unpriced = recorded_run("unpriced", steps=10, total=100, finished=False)
    mark_alive(unpriced)
    app = SftopApp(start="dashboard", run=unpriced, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "step 10/100" in text_of(app, "#run-status"))
        assert "cost" not in text_of(app, "#run-status")
