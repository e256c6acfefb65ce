import re
import tomllib

import pytest
from tui_helpers import text_of, wait_until

from sftop.engine.presets import load_preset, save_preset
from sftop.engine.rundir import list_run_dirs
from sftop.engine.runs import effective_status, stop_run
from sftop.tui.app import SftopApp
from sftop.tui.screens.dashboard import DashboardScreen
from sftop.tui.wizard.dataset_step import DatasetStep
from sftop.tui.wizard.plan_step import PlanStep
from sftop.tui.wizard.screen import WizardScreen


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def current_step(app) -> str:
    return app.screen.query_one("#wizard-body").current


@pytest.mark.timeout(240)
async def test_wizard_launches_the_demo_and_opens_its_dashboard(services):
    app = SftopApp(services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        assert app.screen.query_one("#model-input").value == "builtin:demo-tiny"
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-data"
        data = app.screen.query_one(DatasetStep)
        await wait_until(pilot, lambda: data.result is not None or data.error, timeout=120)
        assert data.error is None and data.result.format == "messages" and data.result.rows_read == 1000
        report = text_of(app, "#data-report")
        assert "format messages (detected)" in report and "no problems found" in report
        assert "What is" in report  # the rendered sample
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-preset"
        lr = app.screen.query_one("#field-max-steps")
        lr.value = ""
        await pilot.click("#field-max-steps")
        await pilot.press(*"12")
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-plan"
        plan = app.screen.query_one(PlanStep)
        await wait_until(pilot, lambda: plan.plan is not None or plan.error, timeout=60)
        assert plan.error is None and plan.plan.device == "cuda:0"
        assert "headroom" in text_of(app, "#plan-view") and "NVIDIA H100" in text_of(app, "#plan-view")
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-launch"
        assert "12 steps" in text_of(app, "#launch-summary")
        await pilot.press(*"my-demo")
        await pilot.press("ctrl+n")
        screen = await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen)
        run = screen.run
        try:
            assert [r.path for r in list_run_dirs()] == [run.path]
            preset = tomllib.loads(run.preset.read_text())
            assert preset["name"] == "my-demo" and preset["train"]["max_steps"] == 12
            assert preset["model"]["name"] == "builtin:demo-tiny"
            status = await wait_until(
                pilot, lambda: run.read_status().get("supervisor_pid") and run.read_status(), timeout=30
            )
            assert status["status"] == "running" and status["pid"] != status["supervisor_pid"]
            saved, _ = load_preset("my-demo")
            assert saved.train.max_steps == 12 and saved.data.source == "builtin:arithmetic"
            await wait_until(pilot, lambda: screen.process_status in ("starting", "running"), timeout=10)
        finally:
            stop_run(run, wait=60, force=True)
        assert effective_status(run) in ("stopped", "failed")


async def test_dataset_failing_validation_shows_the_rows(services):
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 30)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        await pilot.press("ctrl+n")
        data = app.screen.query_one(DatasetStep)
        field = app.screen.query_one("#data-input")
        field.value = "builtin:sample-broken"
        field.focus()
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: data.checked_source == "builtin:sample-broken" and (data.result is not None or data.error),
            timeout=120,
        )
        report = text_of(app, "#data-report")
        assert data.result.bad_rows == 4 and data.result.would_stop
        assert "4 bad rows (20%)" in report and "a run would stop" in report
        lines = report.splitlines()
        for problem in data.result.problems:  # each bad row, by number, with its reason
            pattern = re.compile(rf"^\s*{problem.index}\s+{re.escape(problem.reason[:25])}")
            assert any(pattern.match(line) for line in lines), (problem, report)
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-data"
        assert "Too many rows are bad" in text_of(app, "#wizard-error")


async def test_unreadable_dataset_and_bad_model_path_are_refused(services, tmp_path):
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        app.screen.query_one("#model-input").value = str(tmp_path / "nowhere")
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-model"
        assert "is not a model directory" in text_of(app, "#wizard-error")
        app.screen.query_one("#model-input").value = "builtin:demo-tiny"
        await pilot.press("ctrl+n")
        data = app.screen.query_one(DatasetStep)
        missing = str(tmp_path / "missing.jsonl")
        data.start_check(missing)
        await wait_until(pilot, lambda: data.checked_source == missing and data.error, timeout=120)
        assert "missing.jsonl" in text_of(app, "#data-report")
        app.screen.query_one("#data-input").value = missing
        await pilot.press("ctrl+n")
        assert "This dataset cannot be used" in text_of(app, "#wizard-error")


async def test_plan_refuses_a_model_too_big_without_a_gpu(no_gpu_services, tmp_path):
    from transformers import LlamaConfig

    model_dir = tmp_path / "big-llama"
    LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ).save_pretrained(model_dir)
    preset, _ = load_preset("demo", [f"model.name={model_dir}"])
    path = save_preset(preset.model_copy(update={"name": "big"}), tmp_path / "big.toml")
    app = SftopApp(preset=str(path), services=no_gpu_services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        app.screen.jump_to_plan = True
        app.screen.show_step(3)
        plan = app.screen.query_one(PlanStep)
        await wait_until(pilot, lambda: plan.error or plan.plan is not None, timeout=60)
        assert plan.refused
        view = text_of(app, "#plan-view")
        assert "This run does not fit" in view and "too big to train on the CPU" in view
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-plan"
        assert "does not fit" in text_of(app, "#wizard-error")


async def test_dataset_file_is_picked_from_a_tree(services, tmp_path, monkeypatch):
    import json

    from sftop.engine.data.builtin import load_builtin

    folder = tmp_path / "project"
    folder.mkdir()
    rows = load_builtin("builtin:sample-messages")
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "notes.txt").write_text("not data")
    monkeypatch.chdir(folder)
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        await pilot.press("ctrl+n")
        await pilot.press("ctrl+o")
        from sftop.tui.screens.path_picker import PathPickerScreen

        picker = await wait_until(pilot, lambda: isinstance(app.screen, PathPickerScreen) and app.screen)
        tree = picker.query_one("#picker-tree")
        await wait_until(pilot, lambda: len(tree.root.children) == 1)  # notes.txt is filtered out
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        data = app.screen.query_one(DatasetStep)
        assert app.screen.query_one("#data-input").value == str(folder / "chat.jsonl")
        await wait_until(
            pilot,
            lambda: data.checked_source == str(folder / "chat.jsonl") and (data.result is not None or data.error),
            timeout=120,
        )
        assert data.error is None and data.result.rows_read == len(rows)
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-preset"


async def test_preset_fields_are_validated_in_place(services):
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        wizard = app.screen
        wizard.show_step(2)
        lr = wizard.query_one("#field-lr")
        lr.value = "fast"
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-preset"
        assert "learning rate: 'fast' is not a number" in text_of(app, "#wizard-error")
        lr.value = "1e-4"
        wizard.query_one("#field-lora-r").value = "0"
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-preset"
        assert "lora.r" in text_of(app, "#wizard-error")
        wizard.query_one("#field-lora-r").value = "8"
        wizard.query_one("#field-max-steps").value = ""
        wizard.query_one("#field-epochs").value = "2"
        await pilot.press("ctrl+n")
        assert current_step(app) == "step-plan"
        draft = wizard.draft
        assert (draft.train.learning_rate, draft.lora.r, draft.train.max_steps, draft.train.epochs) == (
            1e-4,
            8,
            None,
            2,
        )


def make_cached_model(cache, repo_id: str) -> None:
    """A model in Hugging Face's cache layout (blobs, refs, snapshots), as a download leaves it."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    blob = folder / "blobs" / "deadbeef"
    blob.write_text('{"model_type": "llama"}')
    (snapshot / "config.json").symlink_to(blob)


async def test_models_in_the_local_hub_cache_are_offered(services, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    make_cached_model(cache, "Qwen/Qwen2.5-0.5B-Instruct")
    services.hf_cache_dir = str(cache)
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
        choices = app.screen.query_one("#model-choices")
        await wait_until(pilot, lambda: choices.option_count == 3)  # after the two built-ins
        assert choices.get_option_at_index(2).id == "Qwen/Qwen2.5-0.5B-Instruct"
        assert "vision-language" not in str(choices.get_option_at_index(2).prompt)
        choices.focus()
        await pilot.press("down", "down", "enter")  # picking a model moves on to the dataset
        assert app.screen.draft.model.name == "Qwen/Qwen2.5-0.5B-Instruct"
        assert current_step(app) == "step-data"
