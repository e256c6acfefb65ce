"""Runs on disk: list them, find one by name, stop one, follow its events.

Status comes from the supervisor's `status.json`, checked against reality: a run whose
supervisor and trainer are both gone without a terminal event is `lost` (the machine
rebooted, or someone sent SIGKILL). A terminal event in `events.jsonl` always wins.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from sftop.engine.errors import SftopError
from sftop.engine.events import TERMINAL_TYPES, read_events
from sftop.engine.rundir import RunDir, list_run_dirs
from sftop.engine.supervisor import (
    ACTIVE_STATUSES,
    TERMINAL_STATUS,
    last_terminal_event,
    process_alive,
    process_start_time,
)
from sftop.kernels.env import env_flag

# Bytes read from the end of events.jsonl to find the latest step without parsing the whole file.
_TAIL_BYTES = 64 * 1024


@dataclass
class RunSummary:
    name: str
    run: RunDir
    status: str  # starting, running, stopping, finished, failed, stopped, lost, unknown
    started: float | None
    ended: float | None
    step: int | None
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    final_loss: float | None
    model: str | None
    preset_name: str | None
    reason: str | None  # why it failed, from run_failed

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def progress(self) -> str:
        if self.step is None:
            return "-"
        return f"{self.step}/{self.total_steps}" if self.total_steps else str(self.step)

    def one_line(self) -> str:
        loss = self.final_loss if self.final_loss is not None else self.loss
        loss_text = f"loss {loss:.4f}" if loss is not None else "loss -"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started)) if self.started else "-"
        return (
            f"{self.name:<40} {self.status:<9} step {self.progress:<11} {loss_text:<12} {started}  {self.model or '?'}"
        )


def _first_record(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            line = fh.readline()
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _tail_records(path: Path) -> list[dict[str, Any]]:
    try:
        size = path.stat().st_size
    except OSError:
        return []
    start = max(0, size - _TAIL_BYTES)
    records, _ = read_events(path, start)
    # Reading from the middle of a line leaves a torn first record, which read_events skips.
    return records


def _terminal_record(tail: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's ending record, unless a later `run_started` (a resume) opened it again."""
    for record in reversed(tail):
        kind = record.get("type")
        if kind == "run_started":
            return None
        if kind in TERMINAL_TYPES:
            return record
    return None


def _model_from_preset(run: RunDir) -> tuple[str | None, str | None]:
    from sftop.engine.presets.loader import tomllib

    try:
        data = tomllib.loads(run.preset.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None, None
    model = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
    return model, data.get("name")


def effective_status(run: RunDir, status: dict[str, Any] | None = None, terminal: dict | None = None) -> str:
    status = run.read_status() if status is None else status
    if terminal is not None:
        return TERMINAL_STATUS[terminal["type"]]
    recorded = status.get("status")
    if recorded in ACTIVE_STATUSES:
        alive = process_alive(status.get("supervisor_pid"), status.get("supervisor_start")) or process_alive(
            status.get("pid"), status.get("trainer_start")
        )
        if alive:
            return recorded
        if recorded == "starting" and time.time() - float(status.get("launched") or 0) < 10:
            return recorded  # the supervisor has not written its pid yet
        return "lost"
    if recorded:
        return recorded
    return "unknown"


# Set by the supervisor for the trainer it starts; absent for `sftop run` typed at a shell.
SUPERVISED_ENV = "SFTOP_SUPERVISED"


def run_in_foreground(run: RunDir, train: Callable[[], int]) -> int:
    """Run `train()` for a run that no supervisor records (`sftop run` in a terminal), recording its
    own pid and outcome in status.json so `sftop runs`, `attach` and `stop` see it as running, and
    as lost if it is killed.  Under the supervisor this just calls `train()`."""
    if env_flag(SUPERVISED_ENV, default=False):
        return train()
    pid = os.getpid()
    started = time.time()
    run.write_status(
        status="running",
        foreground=True,
        pid=pid,
        pgid=None,
        trainer_start=process_start_time(pid),
        started=started,
        supervisor_pid=None,
        exit_code=None,
        ended=None,
    )
    code = 1
    try:
        code = train()
        return code
    finally:
        # a resume's events still hold the earlier attempt's ending: only this attempt's counts
        terminal = last_terminal_event(run, since=started)
        final = TERMINAL_STATUS[terminal["type"]] if terminal else "failed"
        run.write_status(status=final, exit_code=code, ended=time.time())


def summarize(run: RunDir) -> RunSummary:
    status = run.read_status()
    first = _first_record(run.events)
    tail = _tail_records(run.events)
    terminal = _terminal_record(tail)
    step = total = loss = eval_loss = None
    for record in reversed(tail):
        kind = record.get("type")
        if kind == "step" and step is None:
            step, loss, total = record.get("step"), record.get("loss"), record.get("total_steps")
        elif kind == "eval" and eval_loss is None:
            eval_loss = record.get("eval_loss")
        if step is not None and eval_loss is not None:
            break
    started_event = first if first and first.get("type") == "run_started" else None
    if total is None and started_event:
        total = started_event.get("total_steps")
    model, preset_name = _model_from_preset(run)
    if terminal is not None and isinstance(terminal.get("step"), int):
        if terminal["type"] == "run_stopped":
            step = terminal["step"]  # the step saved, where a resume starts; later step lines were lost
        else:
            step = terminal["step"] if step is None or terminal["step"] > step else step
    return RunSummary(
        name=run.name,
        run=run,
        status=effective_status(run, status, terminal),
        started=status.get("started") or (started_event or {}).get("time") or status.get("launched"),
        ended=status.get("ended") or (terminal or {}).get("time"),
        step=step,
        total_steps=total,
        loss=loss,
        eval_loss=eval_loss,
        final_loss=(terminal or {}).get("final_loss"),
        model=model,
        preset_name=preset_name,
        reason=(terminal or {}).get("reason"),
    )


def list_runs(base: Path | None = None) -> list[RunSummary]:
    """Every run in the state dir, newest first."""
    return [summarize(run) for run in list_run_dirs(base)]


def find_run(ref: str | Path | None = None, base: Path | None = None) -> RunDir:
    """A run by directory path, exact name, or unique name prefix/substring; the newest when None."""
    runs = list_run_dirs(base)
    if ref is None or str(ref) == "":
        if not runs:
            raise SftopError("There are no runs yet", hint="Start one with `sftop` or `sftop run demo`")
        return runs[0]
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "preset.toml").exists():
        return RunDir(path.resolve())
    exact = [r for r in runs if r.name == text]
    if exact:
        return exact[0]
    for matches in ([r for r in runs if r.name.startswith(text)], [r for r in runs if text in r.name]):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(r.name for r in matches[:5])
            raise SftopError(f"`{text}` matches {len(matches)} runs ({names})", hint="Give more of the name")
    raise SftopError(
        f"No run named `{text}`",
        hint="`sftop runs` lists the runs; give a name, a unique part of one, or a run directory",
    )


def _signal_trainer(status: dict[str, Any], sig: int) -> None:
    """The trainer's process group (its workers too), or, for a run typed at a shell, the trainer
    alone: its process group is the user's shell job."""
    if status.get("foreground"):
        os.kill(status["pid"], sig)
    else:
        os.killpg(status.get("pgid") or status["pid"], sig)


def stop_run(run: RunDir, wait: bool | float = False, force: bool = False) -> str:
    """Ask a run to stop: SIGTERM, so the trainer saves a checkpoint and exits. Returns a message.

    Returns at once unless `wait` (True: up to 10 minutes, or a number of seconds). With
    `force`, a trainer still alive after the wait gets SIGKILL (its last checkpoint stays).
    `effective_status(run)` gives the status afterwards.
    """
    status = run.read_status()
    current = effective_status(run, status)
    if current not in ACTIVE_STATUSES:
        return f"Run {run.name} is not running (status: {current})"
    if current == "stopping":
        # A second SIGTERM changes nothing in the trainer; say so rather than send it.
        return f"Run {run.name} is already stopping: it saves a checkpoint, then exits. `sftop runs` shows when it has."
    # Recorded before the signal, so the trainer's own final status is always the later write; only
    # while the run is still active, so a run that ended meanwhile keeps the status it ended with.
    run.write_status(only_from=ACTIVE_STATUSES, status="stopping", stop_requested=time.time())
    sent = False
    # The supervisor forwards the signal to the trainer's process group and records the outcome.
    if process_alive(status.get("supervisor_pid"), status.get("supervisor_start")):
        try:
            os.kill(status["supervisor_pid"], signal.SIGTERM)
            sent = True
        except ProcessLookupError:
            pass
    if not sent and process_alive(status.get("pid"), status.get("trainer_start")):
        try:
            _signal_trainer(status, signal.SIGTERM)
            sent = True
        except ProcessLookupError:
            pass
    if not sent:
        return f"Run {run.name} is no longer running (status: {effective_status(run)})"
    if wait is False:
        return f"Stopping run {run.name}: it saves a checkpoint, then exits. `sftop runs` shows when it has."
    timeout = 600.0 if wait is True else float(wait)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = effective_status(run)
        if now not in ACTIVE_STATUSES:
            return _stopped_message(run, now)
        time.sleep(0.1)
    if force:
        status = run.read_status()
        if process_alive(status.get("pid"), status.get("trainer_start")):
            try:
                _signal_trainer(status, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # The supervisor sees the kill and records the run as failed.
            time.sleep(0.5)
        return _stopped_message(run, effective_status(run))
    return f"Run {run.name} is still saving after {timeout:.0f} s; it keeps going in the background"


def _stopped_message(run: RunDir, status: str) -> str:
    latest = run.latest_checkpoint()
    where = f"; newest checkpoint: {latest}" if latest else ""
    return f"Run {run.name} {status}{where}. Resume it with `sftop resume {run.name}`"


def request_checkpoint(run: RunDir) -> Path:
    """Ask the trainer to save a checkpoint at the end of the current step.

    The trainer polls for `RUN_DIR/control/checkpoint` and deletes it once the save is done.
    """
    control = run.path / "control"
    control.mkdir(exist_ok=True)
    path = control / "checkpoint"
    path.write_text(str(time.time()), encoding="utf-8")
    return path


class EventFollower:
    """Replays `events.jsonl` from the start, then yields new complete records as they arrive.

    Polls (inotify is not needed at 4 Hz, and selectors cannot watch regular files on Linux).
    """

    def __init__(self, path: Path, poll_interval: float = 0.25):
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # replaced or truncated: start over
            self.offset = 0
        records, self.offset = read_events(self.path, self.offset)
        return records

    def follow(self, stop: threading.Event | None = None, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
        """Batches of records (at most `batch` each), forever or until `stop` is set.

        An empty batch is yielded on every idle poll so callers can check for cancellation.
        """
        stop = stop or threading.Event()
        while not stop.is_set():
            records = self.read_new()
            for i in range(0, len(records), batch):
                yield records[i : i + batch]
            if not records:
                yield []
                stop.wait(self.poll_interval)
