"""The wizard's task picker: DPO is chosen by keys on the dataset step at 80x24, the dataset is checked
as preference pairs (and refused where it holds none), and the run's draft carries the task."""

import pytest
from tui_helpers import text_of, wait_until

from sftop.tui.app import SftopApp
from sftop.tui.wizard.dataset_step import DatasetStep, builtin_datasets
from sftop.tui.wizard.screen import WizardScreen
from sftop.tui.wizard.task_picker import TaskPicker


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _checked(data, source):
    return lambda: data.checked_source == source and not data.checking and (data.result is not None or data.error)


@pytest.mark.timeout(240)
async def test_dpo_is_picked_by_keys_and_the_pairs_are_checked(services):
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        await pilot.press("ctrl+n")
        data = app.screen.query_one(DatasetStep)
        await wait_until(pilot, _checked(data, "builtin:arithmetic"), timeout=120)
        picker = app.screen.query_one(TaskPicker)
        assert picker.chosen_task == "sft" and "SFT: conversations" in str(picker.query_one("#task-sft").label)
        assert picker.region.bottom <= 24 and picker.region.height == 1  # one line, on screen at 80x24

        # shift+tab from the samples list reaches the picker; right, enter picks DPO
        await pilot.press("shift+tab")
        assert app.focused is picker
        await pilot.press("right", "enter")
        assert picker.chosen_task == "dpo"
        # the conversations are read again as preference pairs, and refused with what to do
        await wait_until(pilot, _checked(data, "builtin:arithmetic"), timeout=120)
        assert data.error and "as preference pairs" in data.error and "chosen" in data.error
        assert "as preference pairs" in text_of(app, "#data-report")
        await pilot.press("ctrl+n")
        assert app.screen.query_one("#wizard-body").current == "step-data"
        assert "cannot be used" in text_of(app, "#wizard-error")

        # the preference sample, picked from the list by keys: its check shows both answers
        await pilot.press("tab")
        assert app.focused is app.screen.query_one("#data-choices")
        await pilot.press(*["down"] * builtin_datasets().index("builtin:arithmetic-preferences"), "enter")
        await wait_until(pilot, _checked(data, "builtin:arithmetic-preferences"), timeout=120)
        assert data.error is None and data.result.format == "preference", data.error
        report = text_of(app, "#data-report")
        assert "format preference (detected)" in report and "no problems found" in report
        assert "prompt p50" in report and "chosen p50" in report and "rejected p50" in report
        assert "rejected: " in report and data.result.sample_rejected.strip() in report

        await pilot.press("ctrl+n")
        assert app.screen.query_one("#wizard-body").current == "step-preset"
        draft = app.screen.draft
        assert draft.train.task == "dpo" and draft.data.source == "builtin:arithmetic-preferences"

        # back on the dataset step the picker shows the draft's task; SFT again re-checks as conversations
        await pilot.press("ctrl+b")
        assert picker.chosen_task == "dpo"
        picker.focus()
        as_pairs = data.result
        await pilot.press("left", "enter")
        await wait_until(
            pilot,
            lambda: data.result is not as_pairs and _checked(data, "builtin:arithmetic-preferences")(),
            timeout=120,
        )
        assert picker.chosen_task == "sft" and app.screen.query_one(DatasetStep)._draft.train.task == "sft"
        assert data.error or data.result.format != "preference"
