"""The live view of one run: loss, throughput, progress, GPUs and the trainer's log.

A thread worker replays `events.jsonl` and then tails it, posting batches; the handler folds
them into a `RunState` and marks the screen dirty; a timer redraws at most twice a second,
so a 100,000-step history or a fast trainer never floods the terminal.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Log, ProgressBar, Sparkline, Static
from textual.worker import get_current_worker

from sftop.engine.rundir import RunDir
from sftop.engine.runs import EventFollower, effective_status, request_checkpoint
from sftop.engine.supervisor import ACTIVE_STATUSES
from sftop.tui.messages import EventsRead, GpuRead, LogTail, RunStatusRead
from sftop.engine.durations import format_duration
from sftop.tui.run_state import RunState, format_count, format_number
from sftop.tui.widgets.gpu_panel import GpuPanel
from sftop.tui.widgets.line_chart import ChartSeries, LineChart
from sftop.tui.app_ref import sftop_app

_LOG_TAIL_BYTES = 32 * 1024
_LOG_LINES = 100
_LOG_PANE_ROWS = 6  # with its border; fewer when the terminal is short
_MAIN_MIN_ROWS = 10  # the stats panel's eight rows and its border
_REPLAY_BATCH = 20_000
STATUS_MARK = {
    "running": ("●", "green"),
    "starting": ("○", "green"),
    "stopping": ("◐", "yellow"),
    "finished": ("✔", "green"),
    "stopped": ("■", "yellow"),
    "failed": ("✘", "red"),
    "lost": ("?", "red"),
    "waiting": ("○", "dim"),
    "unknown": ("?", "dim"),
}


def read_log_tail(path, max_lines: int = _LOG_LINES) -> list[str]:
    """The last lines of stdout.log; a progress bar's carriage returns keep only their last state."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").split("\n")
    if len(data) == _LOG_TAIL_BYTES:
        lines = lines[1:]  # the first line is cut
    cleaned = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines]
    while cleaned and not cleaned[-1].strip():
        cleaned.pop()
    return cleaned[-max_lines:]


def wrap_lines(lines: list[str], width: int) -> list[str]:
    """Each line cut into rows of at most `width` characters, at spaces where there are any."""
    import textwrap

    width = max(10, width - 1)  # one column for the vertical scrollbar's gutter
    rows: list[str] = []
    for line in lines:
        rows.extend(
            textwrap.wrap(line, width, break_on_hyphens=False, replace_whitespace=False, drop_whitespace=True) or [""]
        )
    return rows


def samples_text(samples: list[dict[str, str]], step: int | None) -> Text:
    """`samples @ step 50  What is 5+7? → 12 · ...`: the model's answers, one line each pair."""
    text = Text()
    text.append("samples" + (f" @ step {step}" if step is not None else ""), style="bold")
    for item in samples:
        answer = " ".join(str(item.get("answer", "")).split()) or "(empty)"
        if len(answer) > 40:
            answer = answer[:39] + "…"
        text.append("  ")
        text.append(str(item.get("prompt", "")), style="dim")
        text.append(" → ")
        text.append(answer, style="bold cyan")
    return text


class DashboardScreen(Screen):
    CSS_PATH = "dashboard.tcss"
    BINDINGS = [
        Binding("c", "checkpoint", "Checkpoint now"),
        Binding("s", "stop", "Stop run"),
        Binding("d,escape", "detach", "Detach"),
        Binding("q", "app.request_quit", "Quit"),
        Binding("g", "export_gguf", "GGUF", show=False),
    ]

    def __init__(self, run: RunDir):
        super().__init__()
        self.run = run
        self.state = RunState()
        self.process_status: str | None = None
        self.replayed = False
        self._dirty = False
        self._log_lines: list[str] = []
        self._messages_seen = 0

    @property
    def services(self):
        return self.app.services

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="run-status")
        # A known total from the start: an indeterminate bar animates forever, even on a finished run.
        yield ProgressBar(total=1, id="progress", show_eta=False)
        with Horizontal(id="main"):
            yield LineChart(id="loss-chart", empty_text="waiting for the first step…")
            with Vertical(id="stats"):
                for key, label in (
                    # Most useful first: where a short terminal cuts rows, it cuts the last ones.
                    ("loss", "loss"),
                    ("eval", "eval loss"),
                    ("ckpt", "checkpoint"),
                    ("tps", "tokens/s"),
                    ("mem", "GPU mem"),
                    ("tokens", "tokens"),
                    ("lr", "learn rate"),
                    ("grad", "grad norm"),
                ):
                    with Horizontal(classes="stat"):
                        yield Static(label, classes="stat-label")
                        yield Static("-", id=f"stat-{key}", classes="stat-value")
                # shown for preference tuning (DPO) runs only
                for key, label in (("pref", "pref acc"), ("margin", "margin"), ("rewards", "reward c/r")):
                    with Horizontal(classes="stat preference"):
                        yield Static(label, classes="stat-label")
                        yield Static("-", id=f"stat-{key}", classes="stat-value")
        with Horizontal(id="throughput"):
            yield Static("tokens/s", id="tps-label")
            yield Sparkline([], id="tps-spark")
        yield Static(id="samples")
        yield GpuPanel(id="gpus", compact=True)
        yield Log(id="log", max_lines=_LOG_LINES, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.title = "sftop"
        self.sub_title = self.run.name
        chart = self.query_one("#loss-chart", LineChart)
        chart.border_title = "loss"
        chart.border_subtitle = "━ train  ━ eval"
        self.query_one("#log", Log).border_title = "stdout.log"
        self.query_one("#gpus", GpuPanel).border_title = "GPUs"
        self.set_interval(self.services.redraw_interval, self.redraw)
        self.follow_events()
        self.sample_gpus()
        self.redraw(force=True)

    # --- workers: they only read files and post messages ---------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow", description="follow events")
    def follow_events(self) -> None:
        worker = get_current_worker()
        follower = EventFollower(self.run.events, poll_interval=self.services.poll_interval)
        history = follower.read_new()
        for i in range(0, len(history), _REPLAY_BATCH):
            self.post_message(EventsRead(history[i : i + _REPLAY_BATCH], replayed=False))
        self.post_message(EventsRead([], replayed=True))
        last_side_read = 0.0
        while not worker.is_cancelled:
            records = follower.read_new()
            if records:
                self.post_message(EventsRead(records, replayed=True))
            now = time.monotonic()
            if now - last_side_read >= 1.0:
                last_side_read = now
                self.post_message(LogTail(read_log_tail(self.run.stdout_log)))
                self.post_message(RunStatusRead(effective_status(self.run)))
            time.sleep(self.services.poll_interval)

    @work(thread=True, exclusive=True, exit_on_error=False, group="gpus", description="sample GPUs")
    def sample_gpus(self) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            self.post_message(GpuRead(self.services.gpu_reader()))
            deadline = time.monotonic() + self.services.gpu_interval
            while time.monotonic() < deadline and not worker.is_cancelled:
                time.sleep(0.05)

    # --- message handlers -----------------------------------------------------------------------

    @on(EventsRead)
    def on_events(self, message: EventsRead) -> None:
        self.state.apply(message.records)
        self._dirty = True
        if message.replayed and not self.replayed:
            self.replayed = True
            self._messages_seen = self.state.messages_total  # history is not news
            self.redraw(force=True)
        elif self.replayed:
            # Warnings that happen while watching (a skipped step, a smaller plan) pop up once.
            for level, text in self.state.new_messages(self._messages_seen):
                if level == "warning":
                    self.notify(text, severity="warning", timeout=10)
                elif level == "error":
                    self.notify(text, severity="error", timeout=10)
            self._messages_seen = self.state.messages_total
        if self.state.messages:
            level, text = self.state.messages[-1]
            self.query_one("#log", Log).border_subtitle = text if len(text) <= 60 else text[:59] + "…"

    @on(LogTail)
    def on_log_tail(self, message: LogTail) -> None:
        if message.lines == self._log_lines:
            return
        self._log_lines = message.lines
        self._show_log()

    def _show_log(self) -> None:
        log = self.query_one("#log", Log)
        log.clear()
        # Wrapped to the pane: a cut line (a finished run's last words) and a horizontal scrollbar
        # cost more in an 80-column terminal than the rows wrapping takes.
        log.write_lines(wrap_lines(self._log_lines, log.scrollable_content_region.width or 76))
        # clear() leaves the view at the top, so without this the pane shows the oldest lines.
        log.scroll_end(animate=False)

    def on_resize(self) -> None:
        self.call_after_refresh(self._fit_log)
        if self._log_lines:
            self.call_after_refresh(self._show_log)

    def _fit_log(self) -> None:
        """The log pane gives up rows (down to three) before the chart and stats do: at 80x24 a
        stopped run's resume hint and the samples pane would otherwise cut the stats' last rows."""
        log = self.query_one("#log", Log)
        others = sum(w.outer_size.height for w in self.children if w.display and w.id not in ("main", "log"))
        height = max(3, min(_LOG_PANE_ROWS, self.size.height - others - _MAIN_MIN_ROWS))
        if log.styles.height is None or log.styles.height.value != height:
            log.styles.height = height

    @on(RunStatusRead)
    def on_run_status(self, message: RunStatusRead) -> None:
        if message.status != self.process_status:
            self.process_status = message.status
            self._dirty = True

    @on(GpuRead)
    def on_gpu(self, message: GpuRead) -> None:
        # With several GPUs the supervisor pins the run to one (by UUID): show that one.
        pinned = self.run.read_status().get("cuda_visible_devices")
        self.query_one("#gpus", GpuPanel).show(message.status, only_uuid=pinned)

    # --- drawing --------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """What to show: the event stream's view, unless the processes say otherwise."""
        state = self.state.status
        if state in ("finished", "stopped", "failed"):
            return state
        if self.process_status in ("lost", "failed", "stopped", "finished"):
            return self.process_status
        if self.process_status == "stopping":
            return "stopping"
        if state == "waiting" and self.process_status in ("starting", "running"):
            return "starting"
        return state

    def redraw(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        self._dirty = False
        s = self.state
        self.query_one("#run-status", Static).update(self._status_text())
        bar = self.query_one("#progress", ProgressBar)
        if s.total_steps:
            bar.update(total=s.total_steps, progress=s.step or 0)
        chart = self.query_one("#loss-chart", LineChart)
        chart.set_series(
            [
                ChartSeries("train", s.loss, "cyan"),
                ChartSeries("eval", s.eval_loss, "yellow"),
            ]
            + ([ChartSeries("pref acc", s.reward_accuracy, "green")] if len(s.reward_accuracy) else [])
        )
        self._redraw_preference(chart)
        plan = s.plan or {}
        if plan.get("micro_batch") and plan.get("grad_accum"):
            self.query_one(
                "#stats"
            ).border_title = (
                f"plan {plan['micro_batch']}×{plan['grad_accum']} ckpt {plan.get('gradient_checkpointing', '?')}"
            )
        loss = s.final_loss if s.final_loss is not None else s.last_loss
        self._set("loss", format_number(loss))
        self._set("eval", format_number(s.eval_loss.last))
        self._set("lr", "-" if s.learning_rate is None else f"{s.learning_rate:.2e}" if s.learning_rate else "0")
        self._set("grad", format_number(s.grad_norm, 3))
        self._set("tps", format_count(s.last_tokens_per_s))
        self._set("tokens", format_count(s.tokens_seen))
        self._set("ckpt", f"step {s.last_checkpoint_step}" if s.last_checkpoint_step is not None else "-")
        self._set("mem", f"{s.gpu_mem_reserved_gib:.1f} GiB" if s.gpu_mem_reserved_gib is not None else "-")
        spark = self.query_one("#tps-spark", Sparkline)
        width = max(1, spark.content_size.width or 60)
        spark.data = s.tokens_per_s.downsample(width)[1]
        spark.display = len(s.tokens_per_s) > 1
        self.query_one("#tps-label", Static).update(f"tokens/s {format_count(s.last_tokens_per_s):>6}")
        samples = self.query_one("#samples", Static)
        samples.display = bool(s.samples)
        if s.samples:
            samples.update(samples_text(s.samples, s.samples_step))
        self.call_after_refresh(self._fit_log)  # the status and samples may have changed height

    def _redraw_preference(self, chart: LineChart) -> None:
        s = self.state
        preference = len(s.reward_accuracy) > 0
        for row in self.query(".preference"):
            row.display = preference
        if not preference:
            return
        chart.border_subtitle = "━ train  ━ eval  ━ pref acc"
        self._set("pref", f"{s.reward_accuracy.last:.0%}")
        self._set("margin", format_number(s.reward_margin, 3))
        if s.reward_chosen is not None and s.reward_rejected is not None:
            self._set("rewards", f"{s.reward_chosen:+.2f}/{s.reward_rejected:+.2f}")

    def _set(self, key: str, value: str) -> None:
        self.query_one(f"#stat-{key}", Static).update(value)

    def _status_text(self) -> Text:
        s = self.state
        status = self.status
        mark, color = STATUS_MARK.get(status, ("?", "dim"))
        text = Text()
        text.append(f"{mark} {status}", style=f"bold {color}")
        if s.step is not None:
            text.append(f"  step {s.step}" + (f"/{s.total_steps}" if s.total_steps else ""))
        if s.epoch is not None:
            text.append(f"  epoch {s.epoch:.2f}")
        text.append(f"  elapsed {format_duration(s.elapsed(self.services.clock()), compact=True)}")
        eta = s.eta()
        if eta is not None and status == "running":
            text.append(f"  ETA {format_duration(eta, compact=True)}")
        cost = s.cost(self.services.clock())
        if cost is not None:
            spent, at_end = cost
            text.append(
                f"  cost {spent:.2f}" + (f" of ≈{at_end:.2f}" if at_end is not None and status == "running" else "")
            )
        if status == "finished" and s.final_loss is not None:
            text.append(f"  final loss {format_number(s.final_loss)}", style="bold")
        if status == "failed" and s.terminal and s.terminal.get("reason"):
            text.append(f"\n{s.terminal['reason']}", style="red")
        elif status == "lost":
            text.append("\nthe trainer is gone without a final event; see the log", style="red")
        elif status == "waiting":
            text.append("  no events yet", style="dim")
        if status in ("stopped", "failed", "lost") and (s.checkpoints or (s.terminal or {}).get("checkpoint")):
            text.append(f"\nresume from the last checkpoint: sftop resume {self.run.name}", style="dim")
        return text

    # --- actions --------------------------------------------------------------------------------

    def action_checkpoint(self) -> None:
        if self.status not in ACTIVE_STATUSES:
            self.notify(f"The run is {self.status}: there is nothing to checkpoint", severity="warning")
            return
        request_checkpoint(self.run)
        self.notify("Checkpoint requested: the trainer saves at the end of the current step")

    def action_stop(self) -> None:
        if self.status not in ACTIVE_STATUSES:
            self.notify(f"The run is already {self.status}", severity="warning")
            return

        sftop_app(self).stop_run(self.run)

    def action_export_gguf(self) -> None:
        from sftop.tui.screens.gguf_export import GgufExportScreen

        if self.status in ACTIVE_STATUSES:
            self.notify(f"The run is {self.status}: export it to GGUF once it has finished", severity="warning")
            return
        self.app.push_screen(GgufExportScreen(self.run))

    def action_detach(self) -> None:
        sftop_app(self).action_detach()
