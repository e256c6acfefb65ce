"""The wizard's last step at 80x24: the save-as-preset name survives moving focus with tab."""

import pytest
from tui_helpers import screen_lines, text_of, wait_until

from sftop.tui.app import SftopApp
from sftop.tui.screens.home import HomeScreen
from sftop.tui.wizard.launch_step import LaunchStep
from sftop.tui.wizard.plan_step import PlanStep
from sftop.tui.wizard.screen import WizardScreen


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


async def open_launch_step(pilot):
    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))
    await pilot.press("r")  # re-run the highlighted preset (demo): straight to its plan
    await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
    plan = app.screen.query_one(PlanStep)
    await wait_until(pilot, lambda: plan.plan is not None or plan.error, timeout=60)
    await pilot.press("ctrl+n")
    await wait_until(pilot, lambda: app.screen.query_one("#wizard-body").current == "step-launch")
    return app.screen.query_one(LaunchStep)


@pytest.mark.timeout(120)
async def test_tab_away_and_back_keeps_the_typed_preset_name(services):
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        step = await open_launch_step(pilot)
        assert app.focused is app.screen.query_one("#save-name")
        await pilot.press(*"mine")
        await pilot.press("tab")
        assert app.focused is app.screen.query_one("#launch")
        await pilot.press("shift+tab")
        assert app.focused is app.screen.query_one("#save-name")
        await pilot.press(*"-v2")
        await wait_until(pilot, lambda: any("save as preset  mine-v2" in line for line in screen_lines(app)))
        assert step.save_name == "mine-v2"


@pytest.mark.timeout(120)
async def test_launch_checks_the_data_first_and_starts_nothing_on_bad_data(services, tmp_path):
    from sftop.engine.presets import load_preset, save_preset
    from sftop.engine.rundir import list_run_dirs

    data = tmp_path / "broken.jsonl"
    data.write_text("".join('{"question": "q%d", "answer": "a"}\n' % i for i in range(30)))
    preset, _ = load_preset("demo", [f"data.source={data}"])
    path = save_preset(preset.model_copy(update={"name": "broken"}), tmp_path / "broken.toml")
    app = SftopApp(preset=str(path), services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        wizard = app.screen
        wizard.show_step(3)  # as a re-run does: straight to the plan, the data step never ran
        plan = wizard.query_one(PlanStep)
        await wait_until(pilot, lambda: plan.plan is not None or plan.error, timeout=60)
        await pilot.press("ctrl+n")
        await pilot.press("ctrl+n")  # launch
        await wait_until(pilot, lambda: "Not started" in text_of(app, "#wizard-error"), timeout=60)
        error = text_of(app, "#wizard-error")
        assert "Cannot tell the format of" in error and "broken.jsonl" in error
        assert "--set data.columns.prompt=question" in error  # what to do next
        assert app.screen is wizard and not wizard.launching
        assert list_run_dirs() == []  # no run directory, no trainer, no model loaded
        shown = "\n".join(screen_lines(app))
        print(shown)
        assert "Not started: Cannot tell the format" in shown and "data.columns.prompt=question" in shown
