"""A full disk, on a real small file system (tmpfs): said as "disk full at PATH, N bytes needed",
recorded as `run_failed`, partial files cleaned up, the previous checkpoint intact, and the resume
after space is freed trains exactly what the uninterrupted run trained."""

import os
import re
import signal
import subprocess
import sys

import pytest
from fault_helpers import RUN, STEPS, assert_same_losses, cli_sets, wait_until
from train_helpers import events_of, fast_preset, of_type, start_trainer

from sftop.engine.train.runner import run_training
from sftop.engine.train.trainer import checkpoint_problem

CHUNK = 1 << 16


def _mount_tmpfs(path, size: str) -> str | None:
    """Mount a tmpfs at `path`; the reason when this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root (CI runs as root)"
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    return None if out.returncode == 0 else f"mount -t tmpfs is not permitted here: {out.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "32m")
    if reason:
        pytest.skip(reason)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk, leave: int = 0) -> None:
    """Take all but `leave` bytes of the disk."""
    with open(disk / "filler", "wb", buffering=0) as fh:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        remaining = max(0, free - leave)
        try:
            while remaining > 0:
                n = min(CHUNK, remaining)
                fh.write(b"\0" * n)
                remaining -= n
            if not leave:
                while True:  # the last partial page too
                    fh.write(b"\0" * 512)
        except OSError:
            pass


def test_disk_filled_mid_run_fails_cleanly_and_the_resume_is_exact(home, reference, small_disk):
    _, losses = reference
    run_dir = small_disk / "run"
    proc = start_trainer(run_dir, RUN, home)
    wait_until(
        lambda: of_type(events_of(run_dir), "checkpoint") or proc.poll() is not None, 300, "the first checkpoint"
    )
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        _fill(small_disk, leave=256 * 1024)  # room for event lines, not for the next checkpoint
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 3

    failed = events_of(run_dir)[-1]
    assert failed["type"] == "run_failed"
    match = re.search(r"disk full at (\S+), (\d+) bytes needed", failed["reason"])
    assert match and match.group(1) == str(run_dir / "checkpoints"), failed["reason"]
    assert int(match.group(2)) > 1_000_000  # a checkpoint of the demo is about 2 MB
    assert "sftop resume" in failed["reason"]
    saved = [c["step"] for c in of_type(events_of(run_dir), "checkpoint")]
    assert failed["checkpoint"] == str(run_dir / "checkpoints" / f"checkpoint-{saved[-1]}")
    assert checkpoint_problem(run_dir / "checkpoints" / f"checkpoint-{saved[-1]}") is None  # left intact
    assert not list((run_dir / "checkpoints").glob(".saving-*"))  # partial files cleaned up
    assert "Traceback" not in (run_dir / "stdout.log").read_text()

    (small_disk / "filler").unlink()
    before = failed["time"]
    assert run_training(fast_preset(*RUN), run_dir, resume=True) == 0
    assert assert_same_losses(run_dir, losses, since=before) == list(range(saved[-1] + 1, STEPS + 1))
    assert events_of(run_dir)[-1]["type"] == "run_finished"


def test_starting_on_a_full_disk_says_so_and_leaves_no_temporary_files(home, small_disk):
    _fill(small_disk)
    run_dir = small_disk / "run"
    env = {**os.environ, "SFTOP_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "sftop", "run", "demo", *cli_sets(), "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 3, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert re.search(r"sftop: error: disk full at \S+, \d+ bytes needed", out.stderr), out.stderr
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
