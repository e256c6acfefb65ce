"""A run directory and what lives in it.

runs/<timestamp>-<name>/
    preset.toml      the fully resolved preset the run used (repeat with `sftop run THIS/preset.toml`)
    events.jsonl     the event stream (see sftop.engine.events)
    stdout.log       everything the trainer printed
    status.json      written by the supervisor: pid, pgid, start time, exit code, final status
    checkpoints/     checkpoint-<step>/ directories, each complete or absent (atomic rename)
    adapter/         the final LoRA adapter (PEFT format)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator

from sftop.engine.paths import runs_dir

CHECKPOINT_PREFIX = "checkpoint-"


STATUS_LOCK = ".status.lock"
_held = threading.local()  # the run directories whose status lock this thread holds


@contextlib.contextmanager
def _status_lock(run_path: Path) -> Iterator[None]:
    """An exclusive lock on `run_path`'s status lock file, between processes and threads.

    Re-entrant within a thread: a signal handler that writes the status while the main thread it
    interrupted holds the lock (the supervisor's SIGTERM handler) must not wait on itself."""
    key = str(run_path)
    held = _held.__dict__.setdefault("paths", set())
    if key in held or not run_path.is_dir():
        yield
        return
    import fcntl

    fd = os.open(run_path / STATUS_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def preset(self) -> Path:
        return self.path / "preset.toml"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def stdout_log(self) -> Path:
        return self.path / "stdout.log"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        return self

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_status(self, *, only_from: Collection[str] | None = None, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json atomically (write a temp file, then rename); returns the status.

        Several processes write it (the supervisor, `sftop stop`, a foreground trainer), so the read,
        merge and rename happen under an exclusive lock on the run's status lock file: no writer's
        fields are lost to another's stale read. `only_from`: write only while the recorded status is
        one of these (returns the status unchanged otherwise), so that a late "stopping" never
        replaces the "stopped" or "finished" the run ended with."""
        with _status_lock(self.path):
            current = self.read_status()
            if only_from is not None and current.get("status") not in only_from:
                return current
            status = {**current, **fields}
            # a name of this process's own: two writers never share a temporary file
            tmp = self.status_file.with_name(f".status.{os.getpid()}.{threading.get_ident()}.json.tmp")
            text = json.dumps(status, indent=2)
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, self.status_file)
            except OSError as exc:
                tmp.unlink(missing_ok=True)  # never leave an empty temporary status behind
                from sftop.engine.diskfull import DiskFullError, is_disk_full

                if is_disk_full(exc):
                    raise DiskFullError(self.path, len(text.encode())) from None
                raise
        return status

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first. Temp dirs of an interrupted save never match."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def new_run_dir(name: str, base: Path | None = None, when: float | None = None) -> RunDir:
    base = base or runs_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when or time.time()))
    path = base / f"{stamp}-{_slug(name)}"
    n = 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base / f"{stamp}-{_slug(name)}-{n}"
    return RunDir(path).create()


def register_run_dir(run: RunDir, base: Path | None = None) -> Path | None:
    """Make a run written outside the state dir (`sftop run --run-dir`) visible to `sftop runs`: a
    timestamped link to it in the runs directory. Returns the link, or None when none is needed."""
    base = base or runs_dir()
    target = run.path.resolve()
    if base.exists() and target.parent == base.resolve():
        return None
    base.mkdir(parents=True, exist_ok=True)
    for child in base.iterdir():
        if child.is_symlink() and child.resolve() == target:
            return child
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        link = base / (f"{stamp}-{_slug(run.name)}" + (f"-{n}" if n > 1 else ""))
        try:
            link.symlink_to(target, target_is_directory=True)
            return link
        except FileExistsError:
            # the ranks of a multi-process run register the same directory at the same moment
            if link.is_symlink() and link.resolve() == target:
                return link
            n += 1


def list_run_dirs(base: Path | None = None) -> list[RunDir]:
    """Run directories, newest first."""
    base = base or runs_dir()
    if not base.is_dir():
        return []
    runs = [RunDir(p) for p in base.iterdir() if p.is_dir() and (p / "preset.toml").exists()]
    return sorted(runs, key=lambda r: r.path.name, reverse=True)
