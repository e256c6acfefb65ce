"""A closed terminal and a second trainer: neither may cost the run anything."""

import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
from fault_helpers import RUN, STEPS, alive, assert_same_losses, cli_sets, wait_until
from train_helpers import events_of, fast_preset, of_type, start_trainer, wait_for_steps

from sftop.engine.rundir import RunDir
from sftop.engine.runlock import RunLockedError
from sftop.engine.runs import list_runs
from sftop.engine.train.runner import run_training


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_foreground_run_finishes_after_its_terminal_is_closed(home, reference, tmp_path):
    """`sftop run` typed in a terminal (tmux plays the SSH session); the terminal is killed after
    the first step. Output goes on into stdout.log, and the run ends with `run_finished` and its
    adapter, having trained what the uninterrupted run trained."""
    _, losses = reference
    run_dir = tmp_path / "run"
    env = {
        "SFTOP_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }
    command = " ".join(
        [
            "env",
            "-i",
            *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
            shlex.quote(sys.executable),
            "-m",
            "sftop",
            "run",
            "demo",
            *map(shlex.quote, cli_sets()),
            "--run-dir",
            shlex.quote(str(run_dir)),
        ]
    )
    socket = f"sftop-rel-{os.getpid()}"

    def tmux(*args):
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=False)

    try:
        assert tmux("new-session", "-d", "-s", "ssh", "-x", "80", "-y", "24", command).returncode == 0
        pid = int(tmux("list-panes", "-t", "ssh", "-F", "#{pane_pid}").stdout.split()[0])
        wait_until(lambda: of_type(events_of(run_dir), "step") or not alive(pid), 300, "the first step")
        assert alive(pid), (run_dir / "stdout.log").read_text()[-2000:]
        os.kill(pid, signal.SIGSTOP)  # hold it so that the terminal is gone before its next step line
        assert not of_type(events_of(run_dir), "run_finished"), "the run ended before the terminal closed"
        tmux("kill-server")  # the connection drops: SIGHUP, and every later write to the terminal fails
        os.kill(pid, signal.SIGCONT)
        wait_until(lambda: not alive(pid), 300, "the run to end")
    finally:
        tmux("kill-server")

    records = events_of(run_dir)
    assert records[-1]["type"] == "run_finished", records[-3:]
    assert records[-1]["step"] == STEPS
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert assert_same_losses(run_dir, losses) == list(range(1, STEPS + 1))
    log = (run_dir / "stdout.log").read_text()
    assert f"step {STEPS}/{STEPS}" in log and f"finished at step {STEPS}" in log
    assert RunDir(run_dir).read_status()["status"] == "finished"
    # Started with --run-dir outside the state dir, and still listed by `sftop runs`.
    assert [r.path.resolve() for r in list_runs()].count(run_dir.resolve()) == 1


def test_a_second_trainer_in_a_live_run_directory_is_refused(home, reference, tmp_path, capsys):
    from sftop.cli import main
    from sftop.engine.supervisor import launch_run

    _, losses = reference
    run_dir = tmp_path / "run"
    proc = start_trainer(run_dir, RUN, home)
    wait_for_steps(run_dir, 1, proc)
    os.kill(proc.pid, signal.SIGSTOP)  # a live trainer, held mid-run while the others try to start
    try:
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

        assert main(["run", "demo", *cli_sets(), "--run-dir", str(run_dir)]) == 5
        assert main(["resume", str(run_dir)]) == 5
        err = capsys.readouterr().err
        assert err.count(f"in use by a live trainer (pid {proc.pid})") == 2, err
        assert "sftop stop" in err and "Traceback" not in err
        assert run_training(fast_preset(*RUN), run_dir, resume=True) == 5
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            launch_run(run_dir / "preset.toml", RunDir(run_dir), resume=True)

        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert after == before  # not a byte written: events, preset, checkpoints, status untouched
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 0
    records = events_of(run_dir)
    assert len(of_type(records, "run_started")) == 1 and records[-1]["type"] == "run_finished"
    assert assert_same_losses(run_dir, losses) == list(range(1, STEPS + 1))
    # The lock went with its holder: the directory is free again.
    from sftop.engine.runlock import lock_holder

    assert lock_holder(run_dir) is None


def test_a_lock_left_by_a_killed_trainer_does_not_block(tmp_path):
    """The kernel drops a flock when its holder dies, even by SIGKILL: no stale lock, ever."""
    from sftop.engine.runlock import acquire, lock_holder, release

    code = (
        "import sys, time\nfrom sftop.engine.runlock import acquire\n"
        f"acquire({str(tmp_path)!r})\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    assert lock_holder(tmp_path) == proc.pid
    proc.kill()
    proc.wait()
    assert lock_holder(tmp_path) is None
    acquire(tmp_path)
    acquire(tmp_path)  # nested in one process
    release(tmp_path)
    release(tmp_path)
