"""The wizard screen: five steps in a content switcher, ctrl+n / ctrl+b to move, escape to leave."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, ContentSwitcher, Footer, Header, Static

from sftop.engine.errors import SftopError
from sftop.engine.presets import Preset, load_preset, save_user_preset
from sftop.engine.supervisor import launch_run
from sftop.tui.wizard.base import Step, StepError
from sftop.tui.wizard.dataset_step import DatasetStep
from sftop.tui.wizard.launch_step import LaunchStep
from sftop.tui.wizard.model_step import ModelStep
from sftop.tui.wizard.plan_step import PlanStep
from sftop.tui.wizard.preset_step import PresetStep
from sftop.tui.app_ref import sftop_app


@dataclass
class DataChecked(Message):
    """The data check before a launch is done; `error` is its verdict when the run must not start."""

    draft: Preset
    error: str | None


STEPS: list[tuple[str, type[Step]]] = [
    ("step-model", ModelStep),
    ("step-data", DatasetStep),
    ("step-preset", PresetStep),
    ("step-plan", PlanStep),
    ("step-launch", LaunchStep),
]


class WizardScreen(Screen):
    CSS_PATH = "wizard.tcss"
    BINDINGS = [
        Binding("ctrl+n", "next", "Next", priority=True),
        Binding("ctrl+b", "back", "Back", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, preset: str = "demo", jump_to_plan: bool = False):
        super().__init__()
        self.preset_ref = preset
        self.jump_to_plan = jump_to_plan
        self.index = 0
        self.draft: Preset | None = None
        self.launching = False  # the data check before a launch is running

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="wizard-steps")
        with ContentSwitcher(initial=STEPS[0][0], id="wizard-body"):
            for step_id, cls in STEPS:
                yield cls(id=step_id)
        yield Static("", id="wizard-error")
        with Horizontal(id="wizard-nav"):
            yield Button("Back (ctrl+b)", id="back", compact=True)
            yield Button("Next (ctrl+n)", id="next", variant="primary", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.title = "sftop"
        self.sub_title = "new run"
        try:
            self.draft, _ = load_preset(self.preset_ref)
        except SftopError as exc:
            self.notify(f"{exc} Starting from the demo preset instead.", severity="error", timeout=10)
            self.draft, _ = load_preset("demo")
            self.jump_to_plan = False
        self.show_step(3 if self.jump_to_plan else 0)

    @property
    def step(self) -> Step:
        return self.query_one(f"#{STEPS[self.index][0]}", Step)

    def show_step(self, index: int) -> None:
        self.index = index
        self.query_one("#wizard-body", ContentSwitcher).current = STEPS[index][0]
        self.query_one("#wizard-error", Static).update("")
        steps = Text()
        for i, (_, cls) in enumerate(STEPS):
            if i:
                steps.append(" › ", style="dim")
            style = "bold reverse" if i == index else ("" if i < index else "dim")
            steps.append(f" {i + 1} {cls.title} ", style=style)
        self.query_one("#wizard-steps", Static).update(steps)
        self.query_one("#next", Button).label = "Launch (ctrl+n)" if index == len(STEPS) - 1 else "Next (ctrl+n)"
        self.query_one("#back", Button).disabled = index == 0
        assert self.draft is not None
        self.step.load(self.draft)
        self.step.focus_first()

    def fail(self, message: str) -> None:
        self.query_one("#wizard-error", Static).update(Text(message, style="bold red"))

    def action_next(self) -> None:
        assert self.draft is not None
        try:
            self.draft = self.step.apply(self.draft)
        except StepError as exc:
            self.fail(str(exc))
            return
        except SftopError as exc:
            self.fail(str(exc))
            return
        if self.index < len(STEPS) - 1:
            self.show_step(self.index + 1)
        else:
            self.launch()

    def action_back(self) -> None:
        if self.index > 0:
            self.show_step(self.index - 1)

    def action_cancel(self) -> None:
        self.app.pop_screen()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "next":
            self.action_next()
        elif event.button.id == "back":
            self.action_back()

    def launch(self) -> None:
        """Check the data first (in a worker, as `sftop run` does before anything loads), then
        start the run in `start_run` once the check passes."""
        assert self.draft is not None
        if self.launching:
            return
        self.launching = True
        self.query_one("#wizard-error", Static).update(Text("checking the data before the run starts…", style="dim"))
        self.check_data_then_launch(self.draft)

    @work(thread=True, exclusive=True, exit_on_error=False, group="launch", description="check the data")
    def check_data_then_launch(self, draft: Preset) -> None:
        from sftop.engine.preflight import check_data_before_run
        from sftop.tui.wizard.base import ENGINE_LOCK

        with ENGINE_LOCK:
            try:
                check_data_before_run(draft)
            except SftopError as exc:
                self.post_message(DataChecked(draft, _without_repeated_where(exc)))
                return
            except Exception as exc:  # a bug, but the wizard must still say why nothing started
                self.post_message(DataChecked(draft, f"The data check failed: {exc!r}"))
                raise
        self.post_message(DataChecked(draft, None))

    @on(DataChecked)
    def on_data_checked(self, message: DataChecked) -> None:
        self.launching = False
        if message.error is not None:
            self.fail(f"Not started: {message.error}")
            return
        self.query_one("#wizard-error", Static).update("")
        self.start_run()

    def start_run(self) -> None:
        assert self.draft is not None
        launch_step = self.query_one(LaunchStep)
        try:
            if launch_step.save_name:
                path = save_user_preset(self.draft, launch_step.save_name)
                self.notify(f"Saved preset {launch_step.save_name} ({path})")
            run = launch_run(self.draft)
        except SftopError as exc:
            self.fail(str(exc))
            return
        except OSError as exc:
            self.fail(f"Could not start the run: {exc}")
            return
        self.notify(f"Launched {run.name}. It keeps training if you quit or disconnect.")
        self.app.pop_screen()
        sftop_app(self).attach(run)


def _without_repeated_where(exc: SftopError) -> str:
    """The error as one paragraph, without its "Where:" when the message already names the place
    (a file path said twice costs two lines of an 80x24 screen)."""
    if exc.where and exc.where in exc.what:
        return " ".join(part.rstrip(".") + "." for part in (exc.what, exc.hint) if part)
    return str(exc)
