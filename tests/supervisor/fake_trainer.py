"""A trainer stand-in for supervisor tests: writes real events, and honours SIGTERM like the trainer.

Usage: python fake_trainer.py RUN_DIR STEPS DELAY [EXIT_CODE]
It writes run_started, one step every DELAY seconds, then run_finished; on SIGTERM it writes a
checkpoint and run_stopped. With EXIT_CODE it dies after the steps without a terminal event.
"""

import signal
import sys
import time
from pathlib import Path

from sftop.engine.events import Checkpoint, EventWriter, RunFinished, RunStarted, RunStopped, Step

run_dir, steps, delay = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
exit_code = int(sys.argv[4]) if len(sys.argv) > 4 else None
writer = EventWriter(run_dir / "events.jsonl")
stop = {"asked": False}


def on_term(signum, frame):
    stop["asked"] = True


signal.signal(signal.SIGTERM, on_term)
writer.write(RunStarted(run_dir=str(run_dir), preset={}, environment={}, total_steps=steps))
print("fake trainer started", flush=True)
step = 0
for step in range(1, steps + 1):
    if stop["asked"]:
        break
    writer.write(
        Step(
            step=step,
            epoch=step / steps,
            loss=2.0 / step,
            learning_rate=1e-3,
            grad_norm=1.0,
            tokens_seen=100 * step,
            tokens_per_s=1000.0,
            samples_per_s=10.0,
            total_steps=steps,
        )
    )
    time.sleep(delay)
if stop["asked"]:
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    writer.write(Checkpoint(step=step, path=str(ckpt)))
    writer.write(RunStopped(step=step, signal="SIGTERM", checkpoint=str(ckpt)))
    sys.exit(0)
if exit_code is not None:
    sys.exit(exit_code)
writer.write(RunFinished(step=steps, final_loss=2.0 / steps, adapter_path=None, runtime_s=1.0))
