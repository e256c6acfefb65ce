"""SIGTERM mid-run leaves a complete checkpoint and `run_stopped`; resume continues exactly."""

import shutil
import signal

import pytest

from sftop.engine.rundir import RunDir
from sftop.engine.train.runner import run_training
from sftop.engine.train.trainer import checkpoint_is_complete
from train_helpers import events_of, fast_preset, in_home, of_type, start_trainer, wait_for_steps

STEPS = 10
# save_steps beyond max_steps: the only checkpoint is the one the stop request writes.
RUN = [f"train.max_steps={STEPS}", "train.save_steps=100", "train.learning_rate=2e-3"]


@pytest.fixture(scope="module")
def reference(sftop_home, tmp_path_factory):
    """The same run, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("reference")
    mp = in_home(sftop_home)
    try:
        assert run_training(fast_preset(*RUN), run_dir) == 0
    finally:
        mp.undo()
    return {s["step"]: s["loss"] for s in of_type(events_of(run_dir), "step")}


def test_sigterm_checkpoints_then_resume_matches_uninterrupted_run(home, tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start_trainer(run_dir, RUN, home)
    wait_for_steps(run_dir, 1, proc)
    proc.send_signal(signal.SIGHUP)  # an SSH drop: ignored, training goes on
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0

    records = events_of(run_dir)
    stopped = records[-1]
    assert stopped["type"] == "run_stopped" and stopped["signal"] == "SIGTERM"
    stop_step = stopped["step"]
    assert 3 <= stop_step < STEPS
    assert of_type(records, "step")[-1]["step"] == stop_step  # the step in flight was finished
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{stop_step}"
    assert stopped["checkpoint"] == str(checkpoint)
    assert checkpoint_is_complete(checkpoint)
    assert (checkpoint / "rng_state.pth").is_file()
    assert not list((run_dir / "checkpoints").glob(".saving-*"))
    assert not list(checkpoint.glob("*.bin")) or (checkpoint / "training_args.bin").exists()

    # Leftovers of a save that crashed must never be picked: a staging dir, and a higher-numbered
    # checkpoint that lacks its optimizer state.
    partial = run_dir / "checkpoints" / f"checkpoint-{stop_step + 5}"
    shutil.copytree(checkpoint, partial)
    (partial / "optimizer.pt").unlink()
    shutil.copytree(checkpoint, run_dir / "checkpoints" / f".saving-{stop_step + 6}-x")
    assert RunDir(run_dir).latest_checkpoint() == partial  # name-only view: why completeness is checked

    preset = fast_preset(*RUN)
    assert run_training(preset, run_dir, resume=True) == 0

    records = events_of(run_dir)
    warnings = [m["text"] for m in of_type(records, "message")]
    assert any(f"checkpoint-{stop_step + 5}" in w for w in warnings), warnings
    started = of_type(records, "run_started")
    assert [s["resumed_from_step"] for s in started] == [None, stop_step]
    steps = of_type(records, "step")
    resumed = [s for s in steps if s["time"] > started[1]["time"]]
    assert [s["step"] for s in resumed] == list(range(stop_step + 1, STEPS + 1))
    # Same data order, optimizer, scheduler and RNG: the losses match the uninterrupted run.
    for s in resumed:
        assert s["loss"] == pytest.approx(reference[s["step"]], rel=1e-4, abs=1e-5), s["step"]
    # The token count carries on from the checkpoint instead of restarting at zero.
    before = [s for s in steps if s["step"] == stop_step][0]["tokens_seen"]
    assert resumed[0]["tokens_seen"] > before
    assert records[-1]["type"] == "run_finished" and records[-1]["step"] == STEPS


def test_second_ctrl_c_stops_at_once(tmp_path):
    """`sftop stop` (SIGTERM), then Ctrl-C in the run's terminal: out at once, recording the step saved.

    A process that only installs the handlers and waits, so the second signal always lands while
    the first stop is under way (a real trainer may finish saving first)."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from sftop.engine.train.signals import StopSignals\n"
        f"StopSignals({str(tmp_path / 'events.jsonl')!r}, lambda: 4, lambda: 'checkpoint-4').install()\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert "SIGTERM received" in proc.stdout.readline() + proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)  # `sftop stop` again: only a message
    assert "already stopping" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    last = events_of(tmp_path)[-1]
    assert last["type"] == "run_stopped" and last["signal"] == "SIGTERM+SIGINT"
    assert last["step"] == 4 and last["checkpoint"] == "checkpoint-4"  # the step saved, not the one in flight
