"""The TUI's GGUF export: pick a type by keys, a progress bar while it writes, the result shown."""

from __future__ import annotations

import time

import pytest
import torch
from textual.app import App
from textual.widgets import OptionList, ProgressBar, Static

from gguf_helpers import make_run
from sftop.tui.screens.gguf_export import GgufExportScreen


@pytest.fixture
def demo_run(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftop.engine.models.demo import ensure_demo_model

    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ensure_demo_model()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return make_run(tmp_path / "tui-run", tmp_path / "base", model, AutoTokenizer.from_pretrained(base))


class _Host(App):
    def __init__(self, screen):
        super().__init__()
        self.export_screen = screen

    def on_mount(self) -> None:
        self.push_screen(self.export_screen)


async def _wait(pilot, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


def _text(screen, selector) -> str:
    return str(screen.query_one(selector, Static).content)


async def test_gguf_export_by_keys_with_a_progress_bar(demo_run, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no llama-quantize: no K-quants offered
    screen = GgufExportScreen(demo_run)
    async with _Host(screen).run_test(size=(80, 24)) as pilot:
        options = screen.query_one("#gguf-kind", OptionList)
        assert [options.get_option_at_index(i).id for i in range(options.option_count)] == ["q8_0", "f16", "bf16"]
        await pilot.press("down", "up", "enter")  # q8_0, the first
        await _wait(pilot, lambda: "Written:" in _text(screen, "#dialog-body"))
        bar = screen.query_one("#gguf-progress", ProgressBar)
        assert bar.progress == bar.total > 0
        body = _text(screen, "#dialog-body")
        assert f"{demo_run.name}-q8_0.gguf" in body and "ollama create" in body
        assert (demo_run / "export-gguf-q8_0" / f"{demo_run.name}-q8_0.gguf").is_file()
        await pilot.press("escape")
        await _wait(pilot, lambda: not isinstance(pilot.app.screen, GgufExportScreen))


async def test_gguf_export_error_is_shown_in_the_dialog(demo_run, monkeypatch):
    (demo_run / "adapter" / "adapter_config.json").unlink()
    screen = GgufExportScreen(demo_run)
    async with _Host(screen).run_test(size=(80, 24)) as pilot:
        await pilot.press("enter")
        await _wait(pilot, lambda: "no adapter" in _text(screen, "#dialog-body"))
        assert not screen.query_one("#gguf-progress").display
        await pilot.press("escape")
        await _wait(pilot, lambda: not isinstance(pilot.app.screen, GgufExportScreen))
