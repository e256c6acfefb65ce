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


# The summary's values get the width an 80-column terminal leaves them (box, padding, label).
VALUE_WIDTH = 64


def fit(value: str, width: int = VALUE_WIDTH) -> str:
    """One line: a long path keeps its end (the file name), anything else its start."""
    if len(value) <= width:
        return value
    if "/" in value:
        return "…" + value[-(width - 1) :]
    return value[: width - 1] + "…"


def summarize_draft(draft: Preset, plan=None, run_time=None) -> Text:
    t = draft.train
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    rows = [
        ("model", draft.model.name + ("  (4-bit)" if draft.model.load_in_4bit else "")),
        ("dataset", draft.data.source),
        ("preset", draft.name),
        # One line for the training choices keeps the summary inside an 80x24 terminal.
        (
            "training",
            f"{length}, lr {t.learning_rate:g}, max length {draft.data.max_length}, "
            f"LoRA r={draft.lora.r} alpha={draft.lora.alpha}",
        ),
    ]
    if plan is not None:
        rows.append(
            (
                "plan",
                f"{plan.micro_batch} x {plan.grad_accum}, checkpointing {plan.gradient_checkpointing}"
                f" on {plan.device}, peak {plan.predicted_peak_gib:.1f} GiB",
            )
        )
        from sftop.engine.planner.runtime import describe_run_time

        rows.append(("time", describe_run_time(run_time, plan)))
    text = Text()
    for i, (label, value) in enumerate(rows):
        if i:
            text.append("\n")
        text.append(f"{label:<10}", style="dim")
        text.append(fit(value))
    return text


class LaunchStep(Step):
    title = "Launch"

    def compose(self) -> ComposeResult:
        yield Static("", id="launch-summary")
        with Horizontal(classes="field"):
            yield Static("save as preset", classes="field-label")
            # Not selected on focus: tabbing back into the field and typing must extend the name
            # the user typed, not replace it.
            yield Input(
                placeholder="optional name, e.g. my-run",
                id="save-name",
                classes="field-input",
                compact=True,
                select_on_focus=False,
            )
        yield Button("Launch (ctrl+n)", id="launch", variant="success", compact=True)
        # One line, so that an 80x24 terminal keeps room for a refusal's whole message below it.
        yield Static("Trains in the background: quit or disconnect; `sftop attach` brings it back.", classes="note")

    def load(self, draft: Preset) -> None:
        plan_step = self.wizard.query_one("PlanStep")
        self.query_one("#launch-summary", Static).update(
            summarize_draft(draft, getattr(plan_step, "plan", None), getattr(plan_step, "run_time", None))
        )

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
