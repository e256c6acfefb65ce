"""`events.jsonl`: the one record of a run that the TUI and other tools read.

One JSON object per line, appended and flushed as it happens. Every record has `v` (schema
version), `type`, `time` (Unix seconds) and the fields of its type below. Readers must ignore
unknown fields and unknown types, so new fields never break old readers. docs/events.md
documents the schema; keep the two in step.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1


@dataclass
class Event:
    type: str = field(init=False, default="event")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {
            "v": SCHEMA_VERSION,
            "type": self.type,
            "time": time.time(),
            **{k: v for k, v in data.items() if k != "type"},
        }


@dataclass
class RunStarted(Event):
    run_dir: str
    preset: dict[str, Any]
    environment: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    kernels: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    total_steps: int | None = None
    resumed_from_step: int | None = None
    type: str = field(init=False, default="run_started")


@dataclass
class Resumed(Event):
    """A resume restarts from `step` (its checkpoint): `step` records after it are replayed, and a
    reader drops those of the earlier attempt."""

    step: int
    checkpoint: str | None
    type: str = field(init=False, default="resumed")


@dataclass
class Step(Event):
    step: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_seen: int
    tokens_per_s: float | None
    samples_per_s: float | None
    gpu_mem_allocated_gib: float | None = None
    gpu_mem_reserved_gib: float | None = None
    total_steps: int | None = None
    gpu_mem_peak_gib: float | None = None  # highest allocated so far in this trainer process
    # preference tuning (train.task = "dpo") only: beta * log-ratio to the reference, averaged
    # over the logged steps' pairs; accuracy = share of pairs whose chosen reward beats the rejected
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    type: str = field(init=False, default="step")


@dataclass
class Eval(Event):
    step: int
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    type: str = field(init=False, default="eval")


@dataclass
class Samples(Event):
    """The model's greedy answers to the preset's `train.sample_prompts`, at one evaluation."""

    step: int
    samples: list[dict[str, str]]  # {"prompt": ..., "answer": ...}, in the preset's order
    type: str = field(init=False, default="samples")


@dataclass
class Checkpoint(Event):
    step: int
    path: str
    type: str = field(init=False, default="checkpoint")


@dataclass
class BadStep(Event):
    """An update skipped because the loss or a gradient was NaN or infinite."""

    step: int
    loss: float | None
    grad_norm: float | None
    consecutive: int
    type: str = field(init=False, default="bad_step")


@dataclass
class PlanChanged(Event):
    """The planner stepped the plan down (probe over budget, or an OOM mid-run)."""

    step: int
    reason: str
    old: dict[str, Any]
    new: dict[str, Any]
    type: str = field(init=False, default="plan_changed")


@dataclass
class Message(Event):
    level: str  # "info", "warning" or "error"
    text: str
    type: str = field(init=False, default="message")


@dataclass
class RunFinished(Event):
    step: int
    final_loss: float | None
    adapter_path: str | None
    runtime_s: float
    # what sftop's CUDA graphs did (shapes captured, replays, eager calls, capture seconds); None
    # where the run used none
    graphs: dict[str, Any] | None = None
    type: str = field(init=False, default="run_finished")


@dataclass
class RunStopped(Event):
    step: int
    signal: str
    checkpoint: str | None
    type: str = field(init=False, default="run_stopped")


@dataclass
class RunFailed(Event):
    step: int | None
    reason: str
    checkpoint: str | None = None
    type: str = field(init=False, default="run_failed")


TERMINAL_TYPES = frozenset({"run_finished", "run_stopped", "run_failed"})


class EventWriter:
    """Appends events to `events.jsonl`; safe to call from the trainer thread and signal handlers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, event: Event | dict[str, Any]) -> dict[str, Any]:
        record = event.to_dict() if isinstance(event, Event) else {"v": SCHEMA_VERSION, "time": time.time(), **event}
        line = json.dumps(record, default=_jsonable, allow_nan=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if record.get("type") in TERMINAL_TYPES or record.get("type") == "checkpoint":
                os.fsync(self._file.fileno())  # these lines must survive a power cut
        return record

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def clean_number(value: Any) -> float | None:
    """JSON has no NaN or infinity: store them as None (bad steps are recorded separately)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return number


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read complete lines from `offset`; returns the records and the offset to continue from.

    A last line without its newline is being written: it is left for the next call.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return records, offset
    end = data.rfind(b"\n")
    if end < 0:
        return records, offset
    for line in data[: end + 1].splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash: skip it rather than lose the rest
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end + 1


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    records, _ = read_events(path)
    yield from records
