"""Recorded runs for the TUI tests: real events written with EventWriter, at fixed times."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sftop.engine.events import SCHEMA_VERSION, Checkpoint, Eval, Message, RunFinished, RunStarted, Step
from sftop.engine.presets import load_preset, save_preset
from sftop.engine.rundir import RunDir, new_run_dir

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC: fixed so snapshots and durations never change


def loss_at(step: int) -> float:
    return round(2.5 * math.exp(-step / 40) + 0.3 + 0.05 * math.sin(step), 4)


def write_events(path: Path, records: list[dict]) -> None:
    """Append records with their own `time` (EventWriter stamps the current time, which tests must not)."""
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps({"v": SCHEMA_VERSION, **record}) + "\n")


def event(obj, time: float) -> dict:
    data = obj.to_dict()
    data["time"] = time
    return data


def recorded_run(
    name: str = "demo",
    steps: int = 60,
    total: int = 60,
    finished: bool = True,
    status: str | None = None,
    when: float = T0,
    seconds_per_step: float = 1.5,
    overrides: list[str] | None = None,
) -> RunDir:
    """A run dir as the supervisor and trainer leave it: preset, events, stdout.log, status.json."""
    preset, _ = load_preset("demo", overrides or [])
    run = new_run_dir(name, when=when)
    save_preset(preset.model_copy(update={"name": name}), run.preset)
    records = [
        event(
            RunStarted(run_dir=str(run.path), preset=preset.model_dump(mode="json"), environment={}, total_steps=total),
            when,
        )
    ]
    for step in range(1, steps + 1):
        t = when + step * seconds_per_step
        records.append(
            event(
                Step(
                    step=step,
                    epoch=step / total,
                    loss=loss_at(step),
                    learning_rate=3e-3 * (1 - step / total),
                    grad_norm=0.5 + step / 1000,
                    tokens_seen=512 * step,
                    tokens_per_s=1000.0 + step,
                    samples_per_s=8.0,
                    total_steps=total,
                ),
                t,
            )
        )
        if step % 20 == 0:
            records.append(event(Eval(step=step, eval_loss=loss_at(step) + 0.1), t))
        if step % 30 == 0:
            records.append(event(Checkpoint(step=step, path=str(run.checkpoints / f"checkpoint-{step}")), t))
    end = when + steps * seconds_per_step
    if finished:
        records.append(event(Message(level="info", text="training done"), end))
        records.append(
            event(
                RunFinished(step=steps, final_loss=loss_at(steps), adapter_path=str(run.adapter), runtime_s=end - when),
                end,
            )
        )
    write_events(run.events, records)
    run.stdout_log.write_text("loading model\n" + "".join(f"step {s}\r" for s in range(1, 4)) + "\ntraining\n")
    final = status or ("finished" if finished else "running")
    run.write_status(status=final, started=when, ended=end if finished else None, exit_code=0 if finished else None)
    return run


def mark_alive(run: RunDir) -> None:
    """Make the run look supervised by this test process, so it counts as running."""
    import os

    from sftop.engine.supervisor import process_start_time

    run.write_status(status="running", supervisor_pid=os.getpid(), supervisor_start=process_start_time(os.getpid()))


def big_history(path: Path, steps: int, when: float = T0) -> None:
    """`steps` step events, written fast (no dataclass per record)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {
                    "v": 1,
                    "type": "run_started",
                    "time": when,
                    "run_dir": str(path.parent),
                    "preset": {},
                    "environment": {},
                    "total_steps": steps * 2,
                }
            )
            + "\n"
        )
        for step in range(1, steps + 1):
            fh.write(
                json.dumps(
                    {
                        "v": 1,
                        "type": "step",
                        "time": when + step,
                        "step": step,
                        "epoch": 0.1,
                        "loss": 1.0 + 1.0 / step,
                        "learning_rate": 1e-4,
                        "grad_norm": 1.0,
                        "tokens_seen": step * 100,
                        "tokens_per_s": 5000.0,
                        "samples_per_s": 1.0,
                        "total_steps": steps * 2,
                    }
                )
                + "\n"
            )
