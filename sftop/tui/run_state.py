"""What the dashboard knows about a run, folded from its events (no Textual here).

Series keep prefix sums so a chart can be downsampled to its width in O(width), whatever
the history length: a 100,000-step run redraws as fast as a 100-step one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from sftop.engine.supervisor import TERMINAL_STATUS


class Series:
    """An append-only (x, y) series with O(buckets) downsampling by bucket mean."""

    def __init__(self) -> None:
        self.xs: list[float] = []
        self.ys: list[float] = []
        self._prefix: list[float] = [0.0]

    def __len__(self) -> int:
        return len(self.ys)

    def append(self, x: float, y: float) -> None:
        self.xs.append(x)
        self.ys.append(y)
        self._prefix.append(self._prefix[-1] + y)

    @property
    def last(self) -> float | None:
        return self.ys[-1] if self.ys else None

    def drop_after(self, x: float) -> None:
        """Forget the points past `x`: a resumed run replays them from its checkpoint."""
        keep = len(self.xs)
        while keep and self.xs[keep - 1] > x:
            keep -= 1
        del self.xs[keep:], self.ys[keep:], self._prefix[keep + 1 :]

    def downsample(self, buckets: int) -> tuple[list[float], list[float]]:
        """At most `buckets` points: each the mean of a run of consecutive samples."""
        n = len(self.ys)
        if buckets <= 0 or n == 0:
            return [], []
        if n <= buckets:
            return list(self.xs), list(self.ys)
        xs, ys = [], []
        for b in range(buckets):
            i0 = b * n // buckets
            i1 = (b + 1) * n // buckets
            if i1 <= i0:
                continue
            xs.append(self.xs[i1 - 1])
            ys.append((self._prefix[i1] - self._prefix[i0]) / (i1 - i0))
        return xs, ys


@dataclass
class RunState:
    loss: Series = field(default_factory=Series)
    eval_loss: Series = field(default_factory=Series)
    tokens_per_s: Series = field(default_factory=Series)
    # preference tuning (train.task = "dpo"): the share of pairs whose chosen reward beats the rejected
    reward_accuracy: Series = field(default_factory=Series)
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_seen: int | None = None
    last_loss: float | None = None
    last_tokens_per_s: float | None = None
    gpu_mem_reserved_gib: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    status: str = "waiting"  # waiting (no events yet), running, finished, stopped, failed
    terminal: dict[str, Any] | None = None
    checkpoints: int = 0
    last_checkpoint_step: int | None = None
    bad_steps: int = 0
    plan: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    messages: deque = field(default_factory=lambda: deque(maxlen=50))
    samples: list[dict[str, str]] = field(default_factory=list)  # the newest `samples` event's answers
    samples_step: int | None = None
    price_per_gpu_hour: float | None = None  # the preset's plan.price_per_gpu_hour
    messages_total: int = 0  # ever appended, so a reader can tell which messages are new
    events_seen: int = 0
    # (time, step) of recent steps: the ETA follows the current pace, not the average since start.
    _pace: deque = field(default_factory=lambda: deque(maxlen=50))

    def apply(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.events_seen += 1
            kind = record.get("type")
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(record)

    def _say(self, item: tuple[str, str]) -> None:
        self.messages.append(item)
        self.messages_total += 1

    def new_messages(self, seen: int) -> list[tuple[str, str]]:
        """Messages appended after the first `seen` ones (at most the last 50)."""
        fresh = self.messages_total - seen
        return list(self.messages)[-fresh:] if fresh > 0 else []

    def _on_run_started(self, r: dict[str, Any]) -> None:
        self.status = "running"
        self.terminal = None
        self.ended_at = None
        if self.started_at is None:
            self.started_at = r.get("time")
        self.total_steps = r.get("total_steps") or self.total_steps
        self.plan = r.get("plan") or self.plan
        preset = r.get("preset") or {}
        self.model = (preset.get("model") or {}).get("name") or self.model
        price = (preset.get("plan") or {}).get("price_per_gpu_hour")
        self.price_per_gpu_hour = float(price) if isinstance(price, (int, float)) else None
        self._pace.clear()

    def _on_step(self, r: dict[str, Any]) -> None:
        if self.status == "waiting":
            self.status = "running"
        step = r.get("step")
        self.step = step
        self.total_steps = r.get("total_steps") or self.total_steps
        self.epoch = r.get("epoch")
        self.learning_rate = r.get("learning_rate")
        self.grad_norm = r.get("grad_norm")
        self.tokens_seen = r.get("tokens_seen")
        self.gpu_mem_reserved_gib = r.get("gpu_mem_reserved_gib", self.gpu_mem_reserved_gib)
        loss = r.get("loss")
        if loss is not None and step is not None:
            self.loss.append(step, float(loss))
            self.last_loss = float(loss)
        if r.get("reward_accuracy") is not None and step is not None:
            self.reward_accuracy.append(step, float(r["reward_accuracy"]))
            self.reward_chosen = r.get("reward_chosen")
            self.reward_rejected = r.get("reward_rejected")
            self.reward_margin = r.get("reward_margin")
        tps = r.get("tokens_per_s")
        if tps is not None and step is not None:
            self.tokens_per_s.append(step, float(tps))
            self.last_tokens_per_s = float(tps)
        if step is not None and r.get("time") is not None:
            self._pace.append((float(r["time"]), step))

    def _on_resumed(self, r: dict[str, Any]) -> None:
        # Steps after the checkpoint were logged by the attempt that died; they are trained again.
        raw = r.get("step")
        step = raw if isinstance(raw, int) else 0
        for series in (self.loss, self.tokens_per_s, self.eval_loss):
            series.drop_after(step)
        self.step = step
        self._pace.clear()

    def _on_eval(self, r: dict[str, Any]) -> None:
        if r.get("eval_loss") is not None and r.get("step") is not None:
            self.eval_loss.append(r["step"], float(r["eval_loss"]))

    def _on_samples(self, r: dict[str, Any]) -> None:
        answers = r.get("samples")
        if isinstance(answers, list):
            self.samples = [a for a in answers if isinstance(a, dict)]
            self.samples_step = r.get("step")

    def _on_checkpoint(self, r: dict[str, Any]) -> None:
        self.checkpoints += 1
        self.last_checkpoint_step = r.get("step")
        self._say(("info", f"checkpoint saved at step {r.get('step')}"))

    def _on_bad_step(self, r: dict[str, Any]) -> None:
        self.bad_steps += 1
        self._say(("warning", f"step {r.get('step')} skipped: loss or gradient not finite"))

    def _on_plan_changed(self, r: dict[str, Any]) -> None:
        self.plan = r.get("new") or self.plan
        self._say(("warning", f"plan changed: {r.get('reason')}"))

    def _on_message(self, r: dict[str, Any]) -> None:
        self._say((r.get("level", "info"), str(r.get("text", ""))))

    def _terminal(self, r: dict[str, Any]) -> None:
        self.status = TERMINAL_STATUS[r["type"]]
        self.terminal = r
        self.ended_at = r.get("time")
        if isinstance(r.get("step"), int):
            self.step = r["step"]

    _on_run_finished = _on_run_stopped = _on_run_failed = _terminal

    @property
    def final_loss(self) -> float | None:
        return (self.terminal or {}).get("final_loss")

    def elapsed(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else (now if now is not None else time.time())
        return max(0.0, end - self.started_at)

    def cost(self, now: float | None = None) -> tuple[float, float | None] | None:
        """(spent so far, estimated at the end) at the preset's price per GPU-hour; None without one."""
        elapsed = self.elapsed(now)
        if self.price_per_gpu_hour is None or elapsed is None:
            return None
        per_s = self.price_per_gpu_hour / 3600
        eta = self.eta()
        return elapsed * per_s, (elapsed + eta) * per_s if eta is not None else None

    def eta(self) -> float | None:
        """Seconds left at the recent pace, or None when unknown."""
        if self.status != "running" or not self.total_steps or self.step is None or len(self._pace) < 2:
            return None
        (t0, s0), (t1, s1) = self._pace[0], self._pace[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0.0, (self.total_steps - self.step) * (t1 - t0) / (s1 - s0))


def format_number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def format_count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"
