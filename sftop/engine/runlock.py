"""One trainer per run directory: an exclusive `flock` on `RUN_DIR/.lock`, held for the trainer's life.

Two trainers in one directory interleave their events and delete each other's checkpoints, so a
second start (`sftop run --run-dir` into a live run, `sftop resume` of a run still training) is
refused with the live pid. The kernel drops the lock when its holder dies, even by SIGKILL, so a
crashed run never leaves a stale lock behind; the pid written in the file is only for messages.

The supervisor takes the lock before it starts the trainer and hands the open file to it (the
descriptor number is in SFTOP_RUN_LOCK_FD): both hold the one lock, and it outlives either.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftop.engine.errors import SftopError

LOCK_NAME = ".lock"
LOCK_FD_ENV = "SFTOP_RUN_LOCK_FD"
# The ranks of a multi-process run (sftop.engine.launch): the supervisor holds the lock for all of
# them, and torchrun closes inherited descriptors, so it names the lock file it holds instead.
HELD_ENV = "SFTOP_RUN_LOCK_HELD"

# lock path -> [file descriptor, nesting depth] for the locks this process holds
_held: dict[str, list[int]] = {}


class RunLockedError(SftopError):
    """Another live process is training in this run directory."""

    exit_code = 5


def _lock_path(run_path: Path) -> Path:
    return Path(run_path).resolve() / LOCK_NAME


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def _inherited_fd(path: Path) -> int | None:
    """The lock descriptor a supervisor passed down, when it is this very lock file."""
    raw = os.environ.get(LOCK_FD_ENV)
    if not raw or not raw.isdigit():
        return None
    try:
        held, wanted = os.fstat(int(raw)), os.stat(path)
    except OSError:
        return None
    return int(raw) if (held.st_dev, held.st_ino) == (wanted.st_dev, wanted.st_ino) else None


def _locked_error(run_path: Path, pid: int | None) -> RunLockedError:
    who = f"pid {pid}" if pid else "another process"
    return RunLockedError(
        f"Run directory {run_path} is in use by a live trainer ({who}); a second one would overwrite its "
        "checkpoints and events",
        where=str(run_path),
        hint=f"Wait for it to end, or stop it first with `sftop stop {Path(run_path).name}`; "
        "to train something else, start a new run without --run-dir",
    )


def acquire(run_path: Path) -> int:
    """Take the lock (nesting in this process is fine); raise RunLockedError naming the holder."""
    path = _lock_path(run_path)
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        return _held[key][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get(HELD_ENV) == key:
        _held[key] = [-1, 1]
        return -1
    inherited = _inherited_fd(path)
    if inherited is not None:
        _held[key] = [inherited, 1]
        return inherited
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _locked_error(path.parent, _read_pid(path)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds without the pid, which only serves messages
    _held[key] = [fd, 1]
    return fd


def release(run_path: Path) -> None:
    key = str(_lock_path(run_path))
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    if entry[0] >= 0:
        os.close(entry[0])  # closing the last descriptor drops the flock


@contextmanager
def run_lock(run_path: Path) -> Iterator[int]:
    fd = acquire(run_path)
    try:
        yield fd
    finally:
        release(run_path)


def lock_holder(run_path: Path) -> int | None:
    """The pid of another live process holding the run's lock (0 when it wrote none), else None."""
    path = _lock_path(run_path)
    if str(path) in _held or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path) or 0
    finally:
        os.close(fd)
    return None


def refuse_if_locked(run_path: Path) -> None:
    """Raise RunLockedError before anything is written when another process trains in `run_path`."""
    pid = lock_holder(run_path)
    if pid is not None:
        raise _locked_error(Path(run_path).resolve(), pid or None)
