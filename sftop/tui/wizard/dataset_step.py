"""Step 2, the dataset: a built-in sample, a local file, or a hub id, checked before training.

The check (`sftop.engine.data.check.check_data`) runs in a worker: it reads the rows, detects
the format, tokenizes with the model's tokenizer and reports problems row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from sftop.engine.errors import SftopError
from sftop.engine.presets import Preset
from sftop.tui.wizard.base import ENGINE_LOCK, Step, StepError, with_fields
from sftop.tui.wizard.task_picker import TaskPicker, preference_lines, rejected_sample, task_fields

_SHOWN_PROBLEMS = 12


@dataclass
class DataChecked(Message):
    source: str
    result: Any = None  # DataCheckResult
    error: str | None = None


def builtin_datasets() -> list[str]:
    try:
        from sftop.engine.data.builtin import builtin_names
    except ImportError:
        return ["builtin:arithmetic"]
    return builtin_names()


def render_result(result: Any) -> Group:
    """Format, rows, problems (the rows themselves), and one sample with the trained tokens highlighted."""
    head = Text()
    head.append("format ", style="dim")
    head.append(f"{result.format}{' (forced)' if result.format_forced else ' (detected)'}", style="bold")
    head.append("   rows ", style="dim")
    head.append(f"{result.usable_rows} usable of {result.rows_read}")
    if result.rows_in_source != result.rows_read:
        head.append(f" (source has {result.rows_in_source})", style="dim")
    stats = getattr(result, "stats", None)
    if stats is not None and getattr(stats, "tokens", None):
        head.append("   tokens ", style="dim")
        head.append(f"{stats.tokens:,} ({stats.trained_share:.0%} trained)")
    parts: list[Any] = [head, *preference_lines(result)]
    if getattr(result, "image_stats", None) is not None:
        from sftop.tui.widgets.image_preview import image_summary

        parts.append(image_summary(result.image_stats, result.image_tokens_counted))
    if result.bad_rows:
        style = "bold red" if result.would_stop else "yellow"
        verdict = (
            f"{result.bad_rows} bad rows ({result.bad_fraction:.0%}): more than data.max_bad_fraction "
            f"{result.max_bad_fraction:.0%}, so a run would stop. Fix these rows or raise the limit."
            if result.would_stop
            else f"{result.bad_rows} bad rows ({result.bad_fraction:.0%}) will be skipped."
        )
        parts.append(Text(verdict, style=style))
        table = Table(box=None, pad_edge=False, show_header=True, header_style="dim", expand=True)
        table.add_column("row", justify="right", width=6)
        table.add_column("problem", ratio=1)
        for problem in result.problems[:_SHOWN_PROBLEMS]:
            table.add_row(str(problem.index), problem.reason)
        if len(result.problems) > _SHOWN_PROBLEMS or result.bad_rows > len(result.problems[:_SHOWN_PROBLEMS]):
            table.add_row("…", f"{result.bad_rows - min(len(result.problems), _SHOWN_PROBLEMS)} more")
        parts.append(table)
    else:
        parts.append(Text("no problems found", style="green"))
    if result.sample_spans:
        sample = Text()
        sample.append(f"sample (row {result.sample_index}); ", style="dim")
        sample.append("trained tokens", style="bold black on green")
        sample.append(" highlighted\n", style="dim")
        for text, trained in result.sample_spans:
            sample.append(text, style="black on green" if trained else "")
        sample.append_text(rejected_sample(result))
        if getattr(result, "sample_images", None):
            from sftop.tui.widgets.image_preview import sample_beside_images

            parts.append(sample_beside_images(result.sample_images, result.sample_image_sizes, sample))
        else:
            parts.append(sample)
    return Group(*parts)


class DatasetStep(Step):
    title = "Dataset"
    BINDINGS = [Binding("ctrl+o", "browse", "Browse files")]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checked_source: str | None = None
        self.result: Any = None
        self.error: str | None = None
        self.checking = False
        self._draft: Preset | None = None

    def compose(self) -> ComposeResult:
        # The task on one line, the help in the list's border and a short list: at 80x24 the check
        # below gets the rows.
        yield TaskPicker(id="data-task")
        yield OptionList(*(Option(name, id=name) for name in builtin_datasets()), id="data-choices")
        yield Input(
            placeholder="path to a file, hub id, or builtin:NAME (enter checks it)", id="data-input", compact=True
        )
        with VerticalScroll(id="data-report-scroll"):
            yield Static("", id="data-report")

    def on_mount(self) -> None:
        self.query_one("#data-choices").border_title = "Built-in samples"
        self.query_one(
            "#data-choices"
        ).border_subtitle = "or a file (jsonl, json, csv, parquet) or hub id below · ctrl+o browses"
        self.query_one("#data-report-scroll").border_title = "Check"

    def load(self, draft: Preset) -> None:
        if self._draft is not None and self._draft.model.name != draft.model.name:
            self.checked_source = None  # the tokenizer changed: check again
        if self._draft is not None and self._draft.train.task != draft.train.task:
            self.checked_source = None  # read as the other task's data: check again
        self._draft = draft
        self.query_one(TaskPicker).show(draft.train.task)
        field = self.query_one("#data-input", Input)
        field.value = draft.data.source
        self.start_check(draft.data.source)

    @on(TaskPicker.Changed, "#data-task")
    def on_task(self, event: TaskPicker.Changed) -> None:
        task = self.query_one(TaskPicker).chosen_task
        if self._draft is None or task == self._draft.train.task:
            return
        try:
            self._draft = with_fields(self._draft, **task_fields(self._draft, task))
        except SftopError as exc:
            self.show_error(self._draft.data.source, str(exc))
            return
        self.checked_source = None
        self.start_check(self.query_one("#data-input", Input).value.strip())

    @on(OptionList.OptionHighlighted, "#data-choices")
    def on_highlight(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_id and event.option_list.has_focus:
            self.query_one("#data-input", Input).value = event.option_id

    @on(OptionList.OptionSelected, "#data-choices")
    def on_select(self, event: OptionList.OptionSelected) -> None:
        if event.option_id:
            self.query_one("#data-input", Input).value = event.option_id
            self.start_check(event.option_id)

    @on(Input.Submitted, "#data-input")
    def on_submitted(self, event: Input.Submitted) -> None:
        source = event.value.strip()
        if source and source == self.checked_source and not self.checking:
            self.wizard.action_next()
        elif source:
            self.start_check(source)

    def action_browse(self) -> None:
        from sftop.tui.screens.path_picker import PathPickerScreen

        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one("#data-input", Input).value = str(path)
                self.start_check(str(path))
                self.query_one("#data-input", Input).focus()

        self.app.push_screen(PathPickerScreen("file"), picked)

    def start_check(self, source: str) -> None:
        if self._draft is None or not source:
            return
        if source == self.checked_source and (self.result is not None or self.error is not None or self.checking):
            return
        try:
            draft = with_fields(self._draft, data={"source": source})
        except SftopError as exc:
            self.show_error(source, str(exc))
            return
        self.checking = True
        self.checked_source = source
        self.result = self.error = None
        self.query_one("#data-report", Static).update(Text(f"checking {source}…", style="dim"))
        self.check(draft)

    @work(thread=True, exclusive=True, exit_on_error=False, group="data-check", description="check the dataset")
    def check(self, draft: Preset) -> None:
        try:
            from sftop.engine.data.check import check_data
        except ImportError as exc:
            self.post_message(DataChecked(draft.data.source, error=f"The data check is unavailable ({exc})"))
            return
        with ENGINE_LOCK:
            if get_current_worker().is_cancelled:
                return  # the user picked another source while an earlier check ran
            try:
                from sftop.engine.train.vision_data import vision_check_kwargs

                result = check_data(draft, **vision_check_kwargs(draft))  # a VLM: its exact image tokens
            except SftopError as exc:
                self.post_message(DataChecked(draft.data.source, error=str(exc)))
                return
            except Exception as exc:  # a bug, but the wizard must still say what happened
                self.post_message(DataChecked(draft.data.source, error=f"The data check failed: {exc!r}"))
                raise
        self.post_message(DataChecked(draft.data.source, result=result))

    @on(DataChecked)
    def on_checked(self, message: DataChecked) -> None:
        if message.source != self.checked_source:
            return  # an older check finished after the user picked another source
        self.checking = False
        if message.error is not None:
            self.show_error(message.source, message.error)
            return
        self.result = message.result
        self.query_one("#data-report", Static).update(render_result(message.result))

    def show_error(self, source: str, error: str) -> None:
        self.checking = False
        self.checked_source = source
        self.error = error
        self.query_one("#data-report", Static).update(Text(error, style="red"))

    def apply(self, draft: Preset) -> Preset:
        source = self.query_one("#data-input", Input).value.strip()
        if not source:
            raise StepError("Choose a dataset, or type a file path or hub id")
        if source != self.checked_source:
            self._draft = draft
            self.start_check(source)
            raise StepError("Checking the dataset first: press ctrl+n again when the check is done")
        if self.checking:
            raise StepError("The dataset check is still running")
        if self.error is not None:
            raise StepError("This dataset cannot be used: " + self.error)
        if self.result is not None and self.result.would_stop:
            raise StepError("Too many rows are bad for a run to start: fix them or raise data.max_bad_fraction")
        fields = task_fields(draft, self._draft.train.task) if self._draft is not None else {}
        return with_fields(draft, **{**fields, "data": {**fields.get("data", {}), "source": source}})
