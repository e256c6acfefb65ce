"""Shared runs for the fault-injection suite: one uninterrupted reference, trained once per session.

Every fault test compares its losses with the reference at every step: whatever went wrong, a run
that carries on (or resumes) must train exactly what the uninterrupted run trained.
"""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))

from train_helpers import FAST, events_of, fast_preset, in_home, of_type  # noqa: E402

from sftop.engine.train.runner import run_training  # noqa: E402

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


@pytest.fixture(scope="session")
def reference(sftop_home, tmp_path_factory):
    """The run, uninterrupted: its directory and {step: loss}."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    mp = in_home(sftop_home)
    try:
        assert run_training(fast_preset(*RUN), run_dir) == 0
    finally:
        mp.undo()
    losses = {s["step"]: s["loss"] for s in of_type(events_of(run_dir), "step")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run_dir, losses


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
    import pytest as _pytest

    steps = [s for s in of_type(events_of(run_dir), "step") if s["time"] > since]
    for s in steps:
        assert s["loss"] == _pytest.approx(reference_losses[s["step"]], rel=1e-4, abs=1e-5), s["step"]
    return [s["step"] for s in steps]
