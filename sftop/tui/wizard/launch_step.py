"""Step 5, launch: a summary, an optional name to save the whole choice as a preset, and go."""

from __future__ import annotations

import re

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Input, Static

from sftop.engine.presets import Preset
from sftop.tui.wizard.base import Step, StepError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def summarize_draft(draft: Preset, plan=None) -> Text:
    t = draft.train
    rows = [
        ("model", draft.model.name + ("  (4-bit)" if draft.model.load_in_4bit else "")),
        ("dataset", draft.data.source),
        ("preset", draft.name),
        ("length", f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"),
        ("learning rate", f"{t.learning_rate:g}"),
        ("max length", str(draft.data.max_length)),
        ("LoRA", f"r={draft.lora.r} alpha={draft.lora.alpha}"),
    ]
    if plan is not None:
        rows.append(("plan", f"{plan.describe()} on {plan.device}, peak {plan.predicted_peak_gib:.1f} GiB"))
    text = Text()
    for i, (label, value) in enumerate(rows):
        if i:
            text.append("\n")
        text.append(f"{label:<14}", style="dim")
        text.append(value)
    return text


class LaunchStep(Step):
    title = "Launch"

    def compose(self) -> ComposeResult:
        yield Static("", id="launch-summary")
        with Horizontal(classes="field"):
            yield Static("save as preset", classes="field-label")
            # Not selected on focus: tabbing back into the field and typing must extend the name
            # the user typed, not replace it.
            yield Input(placeholder="optional name, e.g. my-run", id="save-name", classes="field-input", compact=True,
                        select_on_focus=False)
        yield Button("Launch (ctrl+n)", id="launch", variant="success", compact=True)
        yield Static("Training runs in the background: you can quit sftop or lose the connection; "
                     "`sftop attach` brings the dashboard back.", classes="note")

    def load(self, draft: Preset) -> None:
        plan = getattr(self.wizard.query_one("PlanStep"), "plan", None)
        self.query_one("#launch-summary", Static).update(summarize_draft(draft, plan))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "launch":
            event.stop()
            self.wizard.action_next()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.wizard.action_next()

    @property
    def save_name(self) -> str | None:
        name = self.query_one("#save-name", Input).value.strip()
        return name or None

    def apply(self, draft: Preset) -> Preset:
        name = self.save_name
        if name and not _NAME.match(name):
            raise StepError(f"`{name}` cannot be a preset name: use letters, digits, '-', '_' or '.'")
        if name:
            draft = draft.model_copy(update={"name": name})
        return draft
