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
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Input, Static

from sftop.engine.errors import SftopError
from sftop.engine.presets import Preset
from sftop.tui.widgets.memory_bar import legend, stacked_bar
from sftop.tui.wizard.base import ENGINE_LOCK, Step, StepError, with_fields
from sftop.tui.app_ref import sftop_app

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


def parse_memory_cap(raw: str) -> dict[str, float | None]:
    """The cap field's text as `[plan]` keys: "" none, "12" or "12 GiB" GiB, "50%" a share of the GPU.

    Raises StepError naming the field and the accepted forms.
    """
    text = raw.strip().lower()
    none: dict[str, float | None] = {"max_memory_gib": None, "max_memory_fraction": None}
    if text in ("", "none"):
        return none
    try:
        if text.endswith("%"):
            percent = float(text[:-1].strip())
            if not 0 < percent <= 100:
                raise ValueError
            return {**none, "max_memory_fraction": percent / 100}
        for unit in ("gib", "gb", "g"):
            if text.endswith(unit):
                text = text[: -len(unit)].strip()
                break
        gib = float(text)
        if not 0 < gib <= 4096:
            raise ValueError
        return {**none, "max_memory_gib": gib}
    except ValueError:
        raise StepError(
            f"memory cap: {raw.strip()!r} is not a size in GiB or a share of the GPU (e.g. 12 or 50%; empty = no cap)"
        ) from None


def cap_text(draft: Preset) -> str:
    if draft.plan.max_memory_gib is not None:
        return f"{draft.plan.max_memory_gib:g}"
    if draft.plan.max_memory_fraction is not None:
        return f"{100 * draft.plan.max_memory_fraction:g}%"
    return ""


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
    head.append(
        f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} = batch {plan.effective_batch}"
        f"   checkpointing {plan.gradient_checkpointing}" + ("   4-bit" if plan.load_in_4bit else "") + "\n"
    )
    if getattr(plan, "world_size", 1) > 1:
        head.append(
            f"{plan.strategy.upper()} over {plan.world_size} processes (micro-batch and accumulation per "
            f"process): "
            + ", ".join(f"{g['device']} peak {g['predicted_peak_gib']:.2f} GiB" for g in plan.per_gpu)
            + "\n"
        )
    head.append(f"why: {plan.reason}", style="dim")
    segments = memory_segments(plan)
    headroom = plan.headroom_gib
    fits = headroom >= 0
    summary = Text()
    capped = getattr(plan, "max_memory_gib", None) is not None and plan.budget_gib >= plan.max_memory_gib - 1e-3
    summary.append(
        f"peak {plan.predicted_peak_gib:.2f} GiB of {plan.budget_gib:.2f} GiB "
        + ("(memory cap)  " if capped else "free  ")
    )
    summary.append(f"headroom {headroom:.2f} GiB", style="green" if fits else "bold red")
    parts: list[Any] = [
        head,
        Text(""),
        summary,
        stacked_bar(segments, plan.budget_gib, max(10, width)),
        legend(segments + [("headroom", max(0.0, headroom), "bright_black")], width),
    ]
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
        self._draft: Preset | None = None

    def compose(self) -> ComposeResult:
        yield Static(
            "The planner sizes micro-batch, accumulation and checkpointing to fit the free memory.", classes="help"
        )
        with Horizontal(classes="field"):
            yield Static("memory cap", classes="field-label")
            # Sharing the GPU (an inference server): the run stays under this, the planner sizes for it.
            yield Input(
                id="plan-cap",
                classes="field-input",
                compact=True,
                placeholder="GiB or % of the GPU (e.g. 12 or 50%); empty = all free memory",
            )
        yield Static("", id="plan-view")

    def load(self, draft: Preset) -> None:
        self._draft = draft
        cap = self.query_one("#plan-cap", Input)
        with cap.prevent(Input.Changed):
            cap.value = cap_text(draft)
        self._replan(draft)

    @on(Input.Changed, "#plan-cap")
    def on_cap_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._draft is None:
            return
        try:
            self._replan(self.apply_cap(self._draft))
        except (StepError, SftopError) as exc:
            self._key = None
            self.plan, self.error, self.refused, self.planning = None, str(exc), False, False
            self.query_one("#plan-view", Static).update(Text(str(exc), style="red"))

    def apply_cap(self, draft: Preset) -> Preset:
        return with_fields(draft, plan=parse_memory_cap(self.query_one("#plan-cap", Input).value))

    def _replan(self, draft: Preset) -> None:
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
        from sftop.engine.planner import load_model_config
        from sftop.engine.planner.runtime import data_for_estimate, estimate_run_time

        gpus = sftop_app(self).services.gpu_reader()
        train_rows, row_tokens = data_for_estimate(checked)
        with ENGINE_LOCK:
            try:
                # plan.gpus: the GPUs the run will take (several: one process each, DDP)
                from sftop.engine.gpu_select import select_gpus
                from sftop.engine.planner.multi import plan_selection

                plan = plan_selection(
                    draft, load_model_config(draft), select_gpus(draft.plan, gpus), row_tokens_mean=row_tokens
                )
            except SftopError as exc:
                from sftop.engine.errors import ResourceError

                self.post_message(
                    PlanMade(key, error=str(exc), refused=isinstance(exc, ResourceError), on_cpu=gpus.best() is None)
                )
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
                advice = (
                    "Go back (ctrl+b) to choose a model small enough for the CPU (builtin:demo-tiny), "
                    "or run sftop on a machine with an NVIDIA GPU."
                )
            else:
                capped = bool(self.query_one("#plan-cap", Input).value.strip())
                lead = "Raise or clear the memory cap above, or go" if capped else "Go"
                advice = (
                    f"{lead} back (ctrl+b) to choose a smaller model, 4-bit, a shorter max length or a lower LoRA r."
                )
            view.update(
                Group(Text(title, style="bold red"), Text(message.error, style="red"), Text(advice, style="dim"))
            )
            return
        self.plan, self.run_time = message.plan, message.run_time
        view.update(render_plan_view(message.plan, max(20, view.content_size.width or 70), message.run_time))

    def apply(self, draft: Preset) -> Preset:
        draft = self.apply_cap(draft)
        if self.planning:
            raise StepError("Still planning")
        if self.error is not None:
            raise StepError(("The run does not fit: " if self.refused else "") + self.error)
        return draft
