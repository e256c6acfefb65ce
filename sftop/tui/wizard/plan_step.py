"""Step 4, the plan: how the planner sizes the run for the free VRAM, as a memory bar.

The planner never loads weights (config only), so this is quick; it still runs in a worker
because reading a model config can touch the disk cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import Static

from sftop.engine.errors import SftopError
from sftop.engine.presets import Preset
from sftop.tui.widgets.memory_bar import legend, stacked_bar
from sftop.tui.wizard.base import ENGINE_LOCK, Step, StepError

# Breakdown terms grouped into the four parts the bar shows.
GROUPS = [
    ("weights", "blue", ("weights", "dequant_transient")),
    ("LoRA+optimizer", "magenta", ("lora_params", "lora_grads", "optimizer_states")),
    ("activations", "cyan", ("activations", "loss_saved", "loss_peak", "recomputed_layer", "backward_transient")),
    ("other", "bright_black", None),  # everything else: CUDA context, workspace, margins
]


@dataclass
class PlanMade(Message):
    key: str
    plan: Any = None
    error: str | None = None
    refused: bool = False
    on_cpu: bool = False
    run_time: Any = None  # RunTime, the estimate


def memory_segments(plan: Any) -> list[tuple[str, float, str]]:
    breakdown = dict(plan.breakdown)
    segments = []
    named = {term for _, _, terms in GROUPS if terms for term in terms}
    for label, color, terms in GROUPS:
        keys = terms if terms is not None else [k for k in breakdown if k not in named]
        segments.append((label, sum(float(breakdown.get(k, 0.0)) for k in keys), color))
    return segments


def render_plan_view(plan: Any, width: int, run_time: Any = None) -> Group:
    where = plan.device + (f" ({plan.gpu_name})" if plan.gpu_name else "")
    head = Text()
    head.append(f"{plan.model_name} on {where}\n", style="bold")
    head.append(f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} = batch {plan.effective_batch}"
                f"   checkpointing {plan.gradient_checkpointing}"
                + ("   4-bit" if plan.load_in_4bit else "") + "\n")
    head.append(f"why: {plan.reason}", style="dim")
    segments = memory_segments(plan)
    headroom = plan.headroom_gib
    fits = headroom >= 0
    summary = Text()
    summary.append(f"peak {plan.predicted_peak_gib:.2f} GiB of {plan.budget_gib:.2f} GiB free  ")
    summary.append(f"headroom {headroom:.2f} GiB", style="green" if fits else "bold red")
    parts: list[Any] = [head, Text(""), summary, stacked_bar(segments, plan.budget_gib, max(10, width)),
                        legend(segments + [("headroom", max(0.0, headroom), "bright_black")], width)]
    for note in plan.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    parts.append(run_time_text(plan, run_time))
    return Group(*parts)


def run_time_text(plan: Any, run_time: Any) -> Text:
    from sftop.engine.planner.runtime import describe_run_time

    text = Text()
    text.append("time  ", style="bold")
    text.append(describe_run_time(run_time, plan))
    if run_time is not None:
        price_hint = "; set plan.price_per_gpu_hour for the cost" if run_time.price_per_gpu_hour is None else ""
        text.append(f" ({run_time.basis}{price_hint})", style="dim")
    return text


class PlanStep(Step):
    title = "Plan"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.plan: Any = None
        self.run_time: Any = None
        self.error: str | None = None
        self.refused = False
        self.planning = False
        self._key: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("The planner sizes micro-batch, accumulation and checkpointing to fit the free memory.",
                     classes="help")
        yield Static("", id="plan-view")

    def load(self, draft: Preset) -> None:
        key = draft.model_dump_json()
        if key == self._key and not self.planning:
            return
        self._key = key
        self.plan, self.error, self.refused, self.planning = None, None, False, True
        self.query_one("#plan-view", Static).update(Text("planning…", style="dim"))
        self.make_plan(draft, key, self._checked_data(draft))

    def _checked_data(self, draft: Preset) -> Any:
        """The dataset step's check of this draft's data (rows and lengths time the run), if any."""
        from sftop.tui.wizard.dataset_step import DatasetStep

        data = self.wizard.query_one(DatasetStep)
        return data.result if data.checked_source == draft.data.source else None

    @work(thread=True, exclusive=True, exit_on_error=False, group="plan", description="plan the run")
    def make_plan(self, draft: Preset, key: str, checked: Any = None) -> None:
        from sftop.engine.planner import load_model_config, plan_run
        from sftop.engine.planner.runtime import data_for_estimate, estimate_run_time

        gpus = self.app.services.gpu_reader()  # type: ignore[attr-defined]
        train_rows, row_tokens = data_for_estimate(checked)
        with ENGINE_LOCK:
            try:
                plan = plan_run(draft, load_model_config(draft), gpus=gpus, row_tokens_mean=row_tokens)
            except SftopError as exc:
                from sftop.engine.errors import ResourceError

                self.post_message(PlanMade(key, error=str(exc), refused=isinstance(exc, ResourceError),
                                           on_cpu=gpus.best() is None))
                return
            except Exception as exc:  # a bug, but the wizard must still say what happened
                self.post_message(PlanMade(key, error=f"Planning failed: {exc!r}"))
                raise
        self.post_message(PlanMade(key, plan=plan, run_time=estimate_run_time(plan, draft, train_rows)))

    @on(PlanMade)
    def on_plan(self, message: PlanMade) -> None:
        if message.key != self._key:
            return
        self.planning = False
        view = self.query_one("#plan-view", Static)
        if message.error is not None:
            self.error, self.refused = message.error, message.refused
            title = "This run does not fit:" if message.refused else "Cannot plan this run:"
            if message.on_cpu:  # only what works without a GPU: 4-bit needs CUDA
                advice = ("Go back (ctrl+b) to choose a model small enough for the CPU (builtin:demo-tiny), "
                          "or run sftop on a machine with an NVIDIA GPU.")
            else:
                advice = ("Go back (ctrl+b) to choose a smaller model, 4-bit, a shorter max length "
                          "or a lower LoRA r.")
            view.update(Group(Text(title, style="bold red"), Text(message.error, style="red"),
                              Text(advice, style="dim")))
            return
        self.plan, self.run_time = message.plan, message.run_time
        view.update(render_plan_view(message.plan, max(20, view.content_size.width or 70), message.run_time))

    def apply(self, draft: Preset) -> Preset:
        if self.planning:
            raise StepError("Still planning")
        if self.error is not None:
            raise StepError(("The run does not fit: " if self.refused else "") + self.error)
        return draft
