"""Export a run to GGUF (llama.cpp, Ollama, LM Studio): pick the type, watch the progress bar.

The export runs in a thread worker that posts `GgufProgress`/`GgufDone` messages; the screen alone
touches its widgets. Closing is refused while the file is being written, so the export is never left
running without anyone seeing how it ends (it writes to a temporary file either way).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from sftop.engine.errors import SftopError

CHOICES = (
    ("q8_0", "q8_0  8-bit, near-lossless, half the size of f16 (default)"),
    ("f16", "f16   16-bit floats, exact to the merged model"),
    ("bf16", "bf16  16-bit brain floats, as the model trained"),
)
K_QUANT_CHOICES = (
    ("q4_k_m", "q4_k_m  4-bit K-quant (llama-quantize)"),
    ("q5_k_m", "q5_k_m  5-bit K-quant (llama-quantize)"),
    ("q6_k", "q6_k    6-bit K-quant (llama-quantize)"),
)
PHASES = {
    "load": "Loading the base model…",
    "merge": "Merging the adapter…",
    "write": "Writing the GGUF file…",
    "quantize": "Quantizing with llama-quantize…",
}


@dataclass
class GgufProgress(Message):
    phase: str
    done: int
    total: int


@dataclass
class GgufDone(Message):
    out: Path | None  # the export directory, or None on failure
    error: str | None = None


class GgufExportScreen(ModalScreen[None]):
    CSS_PATH = "modal.tcss"
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, run) -> None:
        super().__init__()
        self.run_dir = run
        self.running = False

    def compose(self) -> ComposeResult:
        choices = list(CHOICES)
        if shutil.which("llama-quantize"):
            choices += K_QUANT_CHOICES
        with Vertical(id="dialog"):
            yield Static(f"Export {self.run_dir.name} to GGUF", id="dialog-title")
            yield Static(
                "For llama.cpp, Ollama and LM Studio: the adapter is merged into the base model.", id="dialog-body"
            )
            yield OptionList(*[Option(label, id=kind) for kind, label in choices], id="gguf-kind")
            yield ProgressBar(total=100, show_eta=False, id="gguf-progress")
            yield Static("enter: export   escape: close", id="dialog-hint")

    def on_mount(self) -> None:
        self.query_one("#gguf-progress").display = False
        self.query_one("#gguf-kind", OptionList).focus()

    @on(OptionList.OptionSelected, "#gguf-kind")
    def start(self, event: OptionList.OptionSelected) -> None:
        if self.running:
            return
        self.running = True
        kind = event.option.id
        self.query_one("#gguf-kind").display = False
        self.query_one("#gguf-progress").display = True
        self.query_one("#dialog-hint", Static).update(f"{kind}: {PHASES['load']}")
        self.export(kind)

    @work(thread=True, exit_on_error=False, group="gguf-export", description="export a run to GGUF")
    def export(self, kind: str) -> None:
        from sftop.engine.export.gguf import export_gguf

        def progress(phase: str, done: int, total: int) -> None:
            self.post_message(GgufProgress(phase, done, total))

        try:
            out = export_gguf(self.run_dir, kind, progress=progress)
        except SftopError as exc:
            self.post_message(GgufDone(None, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - shown, not swallowed: the screen must not hang
            self.post_message(GgufDone(None, f"Export failed: {type(exc).__name__}: {exc}"))
            return
        self.post_message(GgufDone(out))

    @on(GgufProgress)
    def on_progress(self, message: GgufProgress) -> None:
        bar = self.query_one("#gguf-progress", ProgressBar)
        if message.phase == "write":
            bar.update(total=message.total, progress=message.done)
        self.query_one("#dialog-hint", Static).update(PHASES[message.phase])

    @on(GgufDone)
    def on_done(self, message: GgufDone) -> None:
        self.running = False
        body = self.query_one("#dialog-body", Static)
        hint = self.query_one("#dialog-hint", Static)
        if message.out is None:
            self.query_one("#gguf-progress").display = False
            body.update(message.error or "Export failed")
            hint.update("escape: close")
            return
        gguf_file = next(message.out.glob("*.gguf"))
        body.update(
            f"Written: {gguf_file}\n\nllama.cpp: llama-cli -m {gguf_file} -cnv\n"
            f"Ollama:    cd {message.out} && ollama create my-model -f Modelfile"
        )
        hint.update("Done. escape: close")

    def action_close(self) -> None:
        if self.running:
            self.notify("The GGUF file is still being written; it can be closed when it is done", severity="warning")
            return
        self.dismiss(None)
