"""The wizard's last step at 80x24: the save-as-preset name survives moving focus with tab."""

import pytest
from tui_helpers import screen_lines, wait_until

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
        await pilot.pause(0.1)
        assert step.save_name == "mine-v2"
        assert any("save as preset  mine-v2" in line for line in screen_lines(app))
