"""Turns the Trainer's callbacks into `events.jsonl` records and honours stop requests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from sftop.engine.events import BadStep, Eval, EventWriter, RunStarted, Step, clean_number
from sftop.engine.train.distributed import agree_any

GIB = 1024**3


def gpu_memory_gib() -> tuple[float | None, float | None, float | None]:
    """(allocated now, reserved now, highest allocated so far) in GiB; Nones without a GPU."""
    if not torch.cuda.is_available():
        return None, None, None
    return (
        round(torch.cuda.memory_allocated() / GIB, 3),
        round(torch.cuda.memory_reserved() / GIB, 3),
        round(torch.cuda.max_memory_allocated() / GIB, 3),
    )


def _step_line(step, total, loss, logs, tokens_per_s, gpu_gib) -> str:
    width = len(str(total or step))
    parts = [f"step {step:>{width}}/{total}" if total else f"step {step}"]
    parts.append(f"loss {loss:.4f}" if loss is not None else "loss skipped (NaN/inf)")
    lr = clean_number(logs.get("learning_rate"))
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    grad = clean_number(logs.get("grad_norm"))
    if grad is not None and loss is not None:
        parts.append(f"grad {grad:.3f}")
    accuracy, margin = clean_number(logs.get("rewards/accuracies")), clean_number(logs.get("rewards/margins"))
    if accuracy is not None and margin is not None:
        parts.append(f"pref acc {accuracy:.2f} margin {margin:+.3f}")
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    if gpu_gib is not None:
        parts.append(f"{gpu_gib:.1f} GiB")
    return "  ".join(parts)


# TRL's DPO metric names -> the Step event's fields
PREFERENCE_LOGS = {
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
}


def preference_fields(logs: dict) -> dict:
    return {field: clean_number(logs.get(key)) for key, field in PREFERENCE_LOGS.items() if key in logs}


class RunEvents(TrainerCallback):
    def __init__(
        self,
        writer: EventWriter,
        *,
        started: Callable[[int], RunStarted],
        stop_requested: Callable[[], str | None],
        checkpoint_request: Path | None = None,
    ):
        self.writer = writer
        # The TUI's "checkpoint now" key creates this file (sftop.engine.runs.request_checkpoint);
        # polling one path per step costs a stat call, far below a training step.
        self._checkpoint_request = checkpoint_request
        self._started = started
        self._stop_requested = stop_requested
        self.trainer = None  # set after the trainer exists (it owns the per-step token counts)
        self.guard = None
        self.total_steps: int | None = None
        self.first_step: int = 0
        self.last_loss: float | None = None
        self.last_logged_step: int = 0
        self.tokens_seen = 0
        self._step_time = None
        self._pending: dict[str, Any] = {}
        self.stopped_by: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.total_steps = state.max_steps
        self.first_step = state.global_step
        self.tokens_seen = int(state.num_input_tokens_seen or 0)
        self.writer.write(self._started(state.max_steps))
        self._step_time = time.perf_counter()
        self._window_tokens = 0
        self._window_samples = 0
        self._window_start = self._step_time

    def on_step_end(self, args, state, control, **kwargs):
        tokens, samples = self.trainer.take_step_counts()
        self.tokens_seen += tokens
        # Saved in trainer_state.json with every checkpoint, so a resumed run keeps counting.
        state.num_input_tokens_seen = self.tokens_seen
        self._window_tokens += tokens
        self._window_samples += samples
        guard = self.guard
        self._write_bad_steps()
        if self._checkpoint_wanted():
            control.should_save = True
        signal_name = self._stop_requested()
        if signal_name and not (guard is not None and guard.failed):
            self.stopped_by = signal_name
            control.should_save = True
            control.should_training_stop = True
        return control

    def _write_bad_steps(self) -> None:
        """The skipped updates the guard has found since the last call (one step late where it reads
        its verdicts late), each before its step's log line."""
        if self.guard is not None:
            for step, consecutive in self.guard.take_unreported():
                self.writer.write(BadStep(step=step, loss=None, grad_norm=None, consecutive=consecutive))

    def _checkpoint_wanted(self) -> bool:
        """The "checkpoint now" request, taken at the same step by every rank of a multi-process run.

        The first rank to see the file removes it, so another rank may never see it; a save that
        only some ranks enter leaves them waiting for each other (FSDP2 gathers the adapter to save
        it) or writes a checkpoint without every rank's state.
        """
        path = self._checkpoint_request
        wanted = agree_any(path is not None and path.exists())
        if wanted and path is not None:
            path.unlink(missing_ok=True)
        return wanted

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs or state.global_step <= self.last_logged_step and state.global_step != 0:
            return
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        self._write_bad_steps()
        bad = self.guard is not None and self.guard.was_bad(state.global_step)
        loss = None if bad else clean_number(logs.get("loss"))
        if loss is not None:
            self.last_loss = loss
        allocated, reserved, peak = gpu_memory_gib()
        self.writer.write(
            Step(
                step=state.global_step,
                epoch=round(float(state.epoch or 0.0), 4),
                loss=loss,
                learning_rate=clean_number(logs.get("learning_rate")),
                grad_norm=None if bad else clean_number(logs.get("grad_norm")),
                tokens_seen=self.tokens_seen,
                tokens_per_s=round(self._window_tokens / elapsed, 1),
                samples_per_s=round(self._window_samples / elapsed, 2),
                gpu_mem_allocated_gib=allocated,
                gpu_mem_reserved_gib=reserved,
                total_steps=self.total_steps,
                gpu_mem_peak_gib=peak,
                **preference_fields(logs),
            )
        )
        print(
            _step_line(state.global_step, self.total_steps, loss, logs, self._window_tokens / elapsed, allocated),
            flush=True,
        )
        self.last_logged_step = state.global_step
        self._window_tokens = 0
        self._window_samples = 0
        self._window_start = now

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        print(f"eval  step {state.global_step}  eval_loss {metrics.get('eval_loss', float('nan')):.4f}", flush=True)
        extra = {
            k: v for k, v in ((k, clean_number(v)) for k, v in metrics.items() if k != "eval_loss") if v is not None
        }
        self.writer.write(Eval(step=state.global_step, eval_loss=clean_number(metrics.get("eval_loss")), metrics=extra))
        # Evaluation time is not training time: do not count it against tokens/s.
        self._window_start = time.perf_counter()
