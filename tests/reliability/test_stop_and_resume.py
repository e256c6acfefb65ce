"""`sftop stop` twice, a resume that would change what is trained, and a resume of a finished run."""

import os
import signal
import subprocess
import sys

from fault_helpers import STEPS, assert_same_losses, cli_sets, wait_until
from train_helpers import events_of, of_type

from sftop.engine.rundir import RunDir
from sftop.engine.runs import stop_run, summarize
from sftop.engine.train.signals import StopSignals
from sftop.engine.train.trainer import checkpoint_problem


def _log(run_dir) -> str:
    try:
        return (run_dir / "stdout.log").read_text()
    except FileNotFoundError:
        return ""


def test_a_second_sigterm_only_says_the_run_is_already_stopping(tmp_path, capsys):
    """The handler alone: a second SIGTERM never takes the exit-now path; a second Ctrl-C does."""
    signals = StopSignals(tmp_path / "events.jsonl", lambda: 4, lambda: None)
    signals._handle(signal.SIGTERM, None)
    signals._handle(signal.SIGTERM, None)  # would os._exit() if it took the immediate path
    assert signals.requested == "SIGTERM"
    assert "already stopping" in capsys.readouterr().out
    assert not (tmp_path / "events.jsonl").exists()


def test_double_stop_saves_then_an_incompatible_resume_is_refused_and_the_resume_is_exact(
    home, reference, tmp_path, capsys
):
    from sftop.cli import main

    _, losses = reference
    run_dir = tmp_path / "run"
    env = {**os.environ, "SFTOP_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    # `sftop run` typed at a shell: it records its own pid in status.json, and `sftop stop` finds it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftop", "run", "demo", *cli_sets("train.save_steps=100"), "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run = RunDir(run_dir)
    wait_until(lambda: of_type(events_of(run_dir), "step") or proc.poll() is not None, 300, "the first step")
    assert proc.poll() is None

    first = stop_run(run)
    assert first.startswith(f"Stopping run {run.name}")
    second = stop_run(run)  # `sftop stop` again while it saves
    assert "already stopping" in second
    wait_until(lambda: "SIGTERM received" in _log(run_dir) or proc.poll() is not None, 60, "the stop to begin")
    try:  # and a raw second SIGTERM, as `kill` or an older sftop sends it: still only a message
        os.kill(proc.pid, signal.SIGTERM)
        raced = False
    except ProcessLookupError:
        raced = True  # it had already saved and exited: nothing left to check for this signal
    assert proc.wait(timeout=300) == 0
    if not raced:
        assert "already stopping" in _log(run_dir)

    stopped = events_of(run_dir)[-1]
    assert stopped["type"] == "run_stopped" and stopped["signal"] == "SIGTERM"
    saved = stopped["step"]
    assert 1 <= saved < STEPS
    assert stopped["checkpoint"] == str(run_dir / "checkpoints" / f"checkpoint-{saved}")
    assert checkpoint_problem(run_dir / "checkpoints" / f"checkpoint-{saved}") is None
    summary = summarize(run)
    assert (summary.status, summary.step) == ("stopped", saved)

    # A resume that would train another adapter shape: refused before anything is written.
    original = run.preset.read_bytes()
    events_before = run.events.read_bytes()
    capsys.readouterr()
    assert main(["resume", str(run_dir), "--set", "lora.r=32", "--set", "train.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "`lora.r` 16 -> 32" in err and "cannot change" in err and "Traceback" not in err
    assert "max_steps" not in err.split("cannot change")[0]  # only the keys that cannot change are named
    assert run.preset.read_bytes() == original
    assert run.events.read_bytes() == events_before
    assert not list(run_dir.glob("preset.resume-*"))

    # The plain resume still works, and trains exactly what the uninterrupted run trained.
    before = events_of(run_dir)[-1]["time"]
    assert main(["resume", str(run_dir)]) == 0
    assert assert_same_losses(run_dir, losses, since=before) == list(range(saved + 1, STEPS + 1))
    assert run.preset.read_bytes() == original  # the run's record is never overwritten
    assert list(run_dir.glob("preset.resume-*.toml"))  # each attempt's resolved preset sits beside it
    resumed = of_type(events_of(run_dir), "resumed")
    assert [r["step"] for r in resumed] == [saved]
    assert events_of(run_dir)[-1]["type"] == "run_finished"


def test_a_finished_run_is_not_trained_past_its_end(home, reference, tmp_path, capsys):
    import shutil

    from sftop.cli import main

    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    events_before = (run_dir / "events.jsonl").read_bytes()

    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"already finished at step {STEPS}" in err and "--set train.max_steps=" in err
    assert (run_dir / "events.jsonl").read_bytes() == events_before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints

    # Asked for more steps, it goes on from the last checkpoint to the new end.
    assert main(["resume", str(run_dir), "--set", f"train.max_steps={STEPS + 2}"]) == 0
    new = [s["step"] for s in of_type(events_of(run_dir), "step")][STEPS:]
    assert new == [STEPS + 1, STEPS + 2]
    assert events_of(run_dir)[-1]["type"] == "run_finished" and events_of(run_dir)[-1]["step"] == STEPS + 2
