"""Helpers of the fault-injection suite: the run every test repeats, and how its faults are made."""

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))

from train_helpers import FAST, events_of, of_type

STEPS = 6
# A checkpoint every 2 steps, all kept: checkpoint-2, -4 and -6, so a fault at one has an older one.
RUN = [f"train.max_steps={STEPS}", "train.save_steps=2", "train.save_total_limit=3", "train.learning_rate=2e-3"]
OVERRIDES = FAST + RUN


def cli_sets(*extra: str) -> list[str]:
    """The same run as `sftop run demo --set ...` arguments."""
    args = []
    for item in OVERRIDES + list(extra):
        args += ["--set", item]
    return args


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waits only for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def killed_copy(reference_dir: Path, dest: Path, after_step: int) -> Path:
    """The reference run as `kill -9` would have left it right after `after_step`: its events up to
    that step, the checkpoints written by then, no adapter."""
    shutil.copytree(reference_dir, dest)
    shutil.rmtree(dest / "adapter")
    for ckpt in (dest / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > after_step:
            shutil.rmtree(ckpt)
    kept = []
    for line in (dest / "events.jsonl").read_text().splitlines(keepends=True):
        kept.append(line)
        if '"type": "step"' in line and f'"step": {after_step},' in line:
            break
    (dest / "events.jsonl").write_text("".join(kept))
    (dest / "status.json").unlink(missing_ok=True)
    return dest


def assert_same_losses(run_dir: Path, reference_losses: dict, since: float = 0.0) -> list[int]:
    """Every step logged after `since` has the reference's loss; returns those steps."""
    steps = [s for s in of_type(events_of(run_dir), "step") if s["time"] > since]
    for s in steps:
        assert s["loss"] == pytest.approx(reference_losses[s["step"]], rel=1e-4, abs=1e-5), s["step"]
    return [s["step"] for s in steps]
