"""Everything fits an 80x24 terminal: no cut lines, no lost rows, no lone scrollbar glyphs.

Each test reads the screen as the user sees it (tui_helpers.screen_lines) at 80 columns by 24 rows.
"""

from tui_helpers import screen_lines, text_of, wait_until
from tui_fixtures import T0, event, recorded_run, write_events

from sftop.engine.events import RunStopped, Samples
from sftop.tui.app import SftopApp
from sftop.tui.screens.dashboard import DashboardScreen

STATS = ("loss", "eval loss", "checkpoint", "tokens/s", "GPU mem", "tokens", "learn rate", "grad norm")
# What Textual draws for a scrollbar's thumb and track.
SCROLLBAR_GLYPHS = set("▁▂▃▄▅▆▇█▉▊▋▌▍▎▏▐")


async def open_dashboard(pilot, app):
    await wait_until(
        pilot,
        lambda: (
            isinstance(app.screen, DashboardScreen) and app.screen.replayed and app.screen.process_status is not None
        ),
        timeout=20,
    )
    return app.screen


async def test_a_finished_runs_last_log_line_is_shown_whole(services):
    run = recorded_run("demo-arithmetic")
    last = (
        "sftop: run finished: adapter saved to /home/someone/.local/state/sftop/runs/"
        "20260101-000000-demo-arithmetic/adapter (final loss 0.84)"
    )
    run.stdout_log.write_text(f"loading model\ntraining\n{last}\n")
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_dashboard(pilot, app)

        def log_shown() -> str:
            return "".join(line.strip("│ ") for line in screen_lines(app)[-7:-2]).replace(" ", "")

        await wait_until(pilot, lambda: screen._log_lines and screen._log_lines[-1] == last)
        await wait_until(pilot, lambda: log_shown().endswith(last.replace(" ", "")))
        log = screen.query_one("#log")
        assert log.region.bottom <= 23 and log.max_scroll_x == 0  # wrapped: nothing to scroll sideways


async def test_a_stopped_run_with_samples_keeps_every_stats_row(services):
    run = recorded_run("demo", steps=30, total=60, finished=False, status="stopped")
    write_events(
        run.events,
        [
            {
                **Samples(
                    step=30,
                    samples=[
                        {"prompt": f"What is {a}+{b}?", "answer": str(a + b)}
                        for a, b in ((5, 7), (3, 8), (12, 30), (41, 9))
                    ],
                ).to_dict(),
                "time": T0 + 45,
            },
            event(RunStopped(step=30, signal="SIGTERM", checkpoint=str(run.checkpoints / "checkpoint-30")), T0 + 50),
        ],
    )
    run.write_status(status="stopped", started=T0, ended=T0 + 50, exit_code=0)
    app = SftopApp(start="dashboard", run=run, services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_dashboard(pilot, app)
        await wait_until(
            pilot, lambda: "sftop resume" in text_of(app, "#run-status") and screen.query_one("#samples").display
        )
        await wait_until(pilot, lambda: "What is 5+7? → 12" in "\n".join(screen_lines(app)))
        await pilot.pause()  # the samples pane shown, the log's rows laid out again
        shown = "\n".join(screen_lines(app))
        for label in STATS:
            assert f"│ {label}" in shown, label
        assert "checkpoint     step 30" in shown
        assert "resume from the last checkpoint: sftop resume 20260101-000000-demo" in shown
        assert "What is 5+7? → 12" in shown
        assert screen.query_one("#log").region.bottom <= 23  # the log gave up rows, not the stats
        assert screen.query_one("#log").region.height >= 3


def runs_ready(app, count):
    from sftop.tui.screens.home import HomeScreen
    from sftop.tui.widgets.runs_table import RunsTable

    return isinstance(app.screen, HomeScreen) and app.screen.query_one(RunsTable).row_count == count


async def test_home_shows_run_names_and_models_without_scrolling_sideways(services):
    from sftop.tui.widgets.runs_table import RunsTable

    recorded_run("demo-arithmetic", when=T0)
    recorded_run("qwen-alpaca", when=T0 + 60, overrides=["model.name=Qwen/Qwen2.5-1.5B-Instruct"])
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        # the runs listed and the GPU panel filled: the home screen's layout is then final
        await wait_until(pilot, lambda: runs_ready(app, 2) and "GiB" in str(app.screen.query_one("#gpus").render()))
        await pilot.pause()
        shown = "\n".join(screen_lines(app))
        assert "20260101-000000-demo-arithmetic  finished" in shown and "builtin:demo-tiny" in shown
        assert "20260101-000100-qwen-alpaca " in shown
        assert "Qwen2.5-1.5B-I" in shown  # the model without its organisation where space is short
        runs = app.screen.query_one(RunsTable)
        presets = app.screen.query_one("#presets")
        assert runs.max_scroll_x == 0 and presets.max_scroll_x == 0  # no horizontal scrollbars
        assert presets.virtual_size.width <= presets.scrollable_content_region.width
        for line in screen_lines(app)[1:-1]:
            inner = line.strip("│╭╮╰╯─ ")
            assert not (inner and set(inner) <= SCROLLBAR_GLYPHS), f"a lone scrollbar glyph: {line!r}"


async def test_the_data_check_shows_the_whole_sample(services, tmp_path, monkeypatch):
    from sftop.tui.wizard.dataset_step import DatasetStep
    from sftop.tui.wizard.screen import WizardScreen

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        await pilot.press("ctrl+n")
        step = app.screen.query_one(DatasetStep)
        await wait_until(pilot, lambda: step.result is not None or step.error, timeout=120)
        await wait_until(pilot, lambda: any("no problems found" in line for line in screen_lines(app)))
        shown = screen_lines(app)
        assert any("no problems found" in line for line in shown)
        assert any("<|im_start|>assistant" in line for line in shown)  # the sample's answer is in view
        report = app.screen.query_one("#data-report-scroll")
        assert report.region.height >= 11 and report.region.bottom <= 22


def no_driver_services(services):
    from dataclasses import replace

    from sftop.engine.gpu import NO_DRIVER_HINT, GpuStatus

    reason = f"NVIDIA driver not found (libnvidia-ml.so): {NO_DRIVER_HINT}"
    return replace(services, gpu_reader=lambda: GpuStatus(gpus=[], reason=reason))


async def plan_view_of(pilot, preset_ref):
    from sftop.tui.wizard.plan_step import PlanStep
    from sftop.tui.wizard.screen import WizardScreen

    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen) and app.screen.draft is not None)
    app.screen.show_step(3)
    plan = app.screen.query_one(PlanStep)
    await wait_until(pilot, lambda: plan.plan is not None or plan.error, timeout=60)
    await wait_until(pilot, lambda: text_of(app, "#plan-view").strip())
    await pilot.pause()  # laid out: the callers measure where the view ends
    return plan, text_of(app, "#plan-view")  # unwrapped: a phrase may span two screen rows


async def test_the_cpu_plan_says_there_is_no_gpu_once(services, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = SftopApp(preset="demo", services=no_driver_services(services))
    async with app.run_test(size=(80, 24)) as pilot:
        plan, shown = await plan_view_of(pilot, "demo")
        assert plan.plan.device == "cpu"
        assert shown.count("driver not found") == 1
        assert "sftop will plan for the CPU" not in shown  # the plan itself says what happens
        assert "no time estimate on the CPU" in shown


async def test_a_refusal_on_the_cpu_suggests_only_what_works_there(services, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from sftop.engine.presets import load_preset, save_preset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "big-llama"
    LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ).save_pretrained(model_dir)
    preset, _ = load_preset("demo", [f"model.name={model_dir}"])
    path = save_preset(preset.model_copy(update={"name": "big"}), tmp_path / "big.toml")
    app = SftopApp(preset=str(path), services=no_driver_services(services))
    async with app.run_test(size=(80, 24)) as pilot:
        plan, shown = await plan_view_of(pilot, str(path))
        assert plan.refused and "too big to train on the CPU" in shown
        assert "sftop will plan for the CPU" not in shown  # no promise the refusal then breaks
        assert "4-bit" not in shown  # 4-bit needs a CUDA GPU: not suggested here
        assert "builtin:demo-tiny" in shown and "machine with an NVIDIA GPU" in shown
        assert app.screen.query_one("#plan-view").region.bottom <= 22  # all of it above the buttons


async def test_4bit_is_not_offered_without_a_gpu(services, monkeypatch):
    from textual.widgets import Checkbox

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = SftopApp(preset="demo", services=no_driver_services(services))
    async with app.run_test(size=(80, 24)) as pilot:
        from sftop.tui.wizard.screen import WizardScreen

        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen) and app.screen.draft is not None)
        app.screen.show_step(2)  # loads the step's fields at once
        box = app.screen.query_one("#field-4bit", Checkbox)
        assert box.disabled and not box.value
        assert "needs an NVIDIA GPU; none here" in str(box.label)
    app = SftopApp(preset="demo", services=services)  # with a GPU it is offered
    async with app.run_test(size=(80, 24)) as pilot:
        from sftop.tui.wizard.screen import WizardScreen

        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen) and app.screen.draft is not None)
        app.screen.show_step(2)  # loads the step's fields at once
        box = app.screen.query_one("#field-4bit", Checkbox)
        assert not box.disabled and "none here" not in str(box.label)
