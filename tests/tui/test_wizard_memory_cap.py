"""The wizard's plan step sets the memory cap by keys, and re-plans under it (80x24)."""

import pytest
from tui_helpers import text_of, wait_until

from sftop.tui.app import SftopApp
from sftop.tui.wizard.plan_step import PlanStep, parse_memory_cap
from sftop.tui.wizard.base import StepError
from sftop.tui.wizard.screen import WizardScreen


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_cap_field_forms():
    assert parse_memory_cap("") == {"max_memory_gib": None, "max_memory_fraction": None}
    assert parse_memory_cap(" 12 GiB ") == {"max_memory_gib": 12.0, "max_memory_fraction": None}
    assert parse_memory_cap("50%") == {"max_memory_gib": None, "max_memory_fraction": 0.5}
    for bad in ("lots", "0", "150%", "-3"):
        with pytest.raises(StepError, match="is not a size in GiB or a share of the GPU"):
            parse_memory_cap(bad)


async def test_memory_cap_is_set_in_the_plan_step_by_keys(services):
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        wizard = await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen) and app.screen)
        wizard.jump_to_plan = True
        wizard.show_step(3)
        plan = wizard.query_one(PlanStep)
        await wait_until(pilot, lambda: plan.plan is not None or plan.error, timeout=60)
        assert plan.plan.max_memory_gib is None and plan.plan.budget_gib > 50  # the fixed H100 has 60 GiB free
        assert app.focused is wizard.query_one("#plan-cap")
        await pilot.press("0", ".", "5")
        await wait_until(pilot, lambda: plan.error and not plan.planning, timeout=60)
        view = text_of(app, "#plan-view")
        assert "This run does not fit" in view and "raise plan.max_memory_gib to" in view
        await pilot.press("ctrl+n")
        assert "does not fit" in text_of(app, "#wizard-error")
        await pilot.press("backspace", "backspace", "backspace", "3")
        await wait_until(pilot, lambda: plan.plan is not None and not plan.planning, timeout=60)
        assert plan.plan.max_memory_gib == 3.0 and plan.plan.budget_gib == 3.0
        assert "of 3.00 GiB (memory cap)" in text_of(app, "#plan-view")
        await pilot.press("ctrl+n")
        assert wizard.query_one("#wizard-body").current == "step-launch"
        assert wizard.draft.plan.max_memory_gib == 3.0 and wizard.draft.plan.max_memory_fraction is None
        await pilot.press("ctrl+b")
        assert wizard.query_one("#plan-cap").value == "3"
        wizard.query_one("#plan-cap").value = ""
        await pilot.click("#plan-cap")
        await pilot.press(*"25%")
        await wait_until(pilot, lambda: plan.plan is not None and plan.plan.max_memory_gib == 20.0, timeout=60)
        await pilot.press("ctrl+n")
        assert wizard.draft.plan.max_memory_fraction == 0.25 and wizard.draft.plan.max_memory_gib is None
