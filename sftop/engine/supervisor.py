"""Launch a run so that it outlives the terminal, and watch over its trainer.

`launch_run` writes the run's resolved `preset.toml` and starts a detached supervisor:
its own session (so an SSH hangup never reaches it), stdin from /dev/null, output to the
run's `stdout.log`. The supervisor (`python -m sftop.engine.supervisor RUN_DIR`) runs the
trainer (`python -m sftop run RUN_DIR/preset.toml --run-dir RUN_DIR`) as its child in
the child's own process group, and records in `status.json`:

    status             starting -> running -> finished | failed | stopped
    supervisor_pid     the supervisor; `supervisor_start` is its /proc start time (pid reuse guard)
    pid, pgid          the trainer and its process group (`sftop stop` signals the group)
    trainer_start      the trainer's /proc start time
    started, ended     Unix times
    exit_code          the trainer's exit code (negative: killed by that signal)

A re-attaching TUI is not the supervisor's parent and cannot wait for it, which is why the
supervisor writes the outcome down. When the trainer dies without writing a terminal event
(killed, segfault, an import error), the supervisor writes `run_failed` so every reader sees
the end of the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sftop.engine.allocator import allocator_env
from sftop.engine.events import TERMINAL_TYPES, EventWriter, RunFailed, read_events
from sftop.engine.presets import Preset, load_preset, save_preset
from sftop.engine.rundir import RunDir, new_run_dir
from sftop.engine.runlock import LOCK_FD_ENV, RunLockedError, refuse_if_locked
from sftop.engine.runlock import acquire as run_lock_acquire
from sftop.engine.runlock import release as run_lock_release

# The status a terminal event maps to.
TERMINAL_STATUS = {"run_finished": "finished", "run_stopped": "stopped", "run_failed": "failed"}
ACTIVE_STATUSES = frozenset({"starting", "running", "stopping"})


def trainer_command(run_dir: RunDir, resume: bool = False, preset_path: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "sftop", "run", str(preset_path or run_dir.preset), "--run-dir", str(run_dir.path)]
    if resume:
        cmd.append("--resume")
    return cmd


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (from /proc), or None if it is gone.

    A pid alone is not an identity: the kernel reuses them. (pid, start time) is.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: the fields after the last ')' are fixed.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields and fields[0] in (b"Z", b"X"):
        return None  # a zombie has exited; only its parent has not reaped it yet
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start_time: int | None = None) -> bool:
    if not pid:
        return False
    if Path("/proc").is_dir():
        now = process_start_time(pid)
        return now is not None and (start_time is None or now == start_time)
    try:  # no /proc (macOS): best effort
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Supervisors started by this process: kept so they can be reaped (no zombies while the TUI runs).
_launched: list[subprocess.Popen] = []


def _reap() -> None:
    for proc in list(_launched):
        if proc.poll() is not None:
            _launched.remove(proc)


def launch_run(
    preset: str | Path | Preset,
    run_dir: RunDir | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    command: list[str] | None = None,
) -> RunDir:
    """Write the run's preset and start its detached supervisor; returns at once.

    `preset` is a preset name, a path, or a `Preset`. With `resume=True` and an existing
    `run_dir`, the run continues from its latest checkpoint with the preset it already has
    (unless a preset is given explicitly as a `Preset`). `command` replaces the trainer
    command line (the default is `trainer_command`).
    """
    _reap()
    if isinstance(preset, Preset):
        resolved = preset
    else:
        resolved, _ = load_preset(preset, overrides)
    if run_dir is None:
        from sftop.engine.run_admin import run_label

        run_dir = new_run_dir(run_label(resolved))
    else:
        # Refused before anything is written: a live trainer's directory, an incompatible resume.
        refuse_if_locked(run_dir.path)
        if resume and run_dir.preset.exists():
            from sftop.engine.train.resume_check import check_resume, resume_preset_path

            check_resume(run_dir, resolved)
            if (isinstance(preset, Preset) or overrides) and command is None:
                # The run's own preset.toml stays as it was; this attempt's changes go beside it.
                command = trainer_command(run_dir, True, save_preset(resolved, resume_preset_path(run_dir)))
        run_dir = run_dir.create()
    if not (resume and run_dir.preset.exists()):
        save_preset(resolved, run_dir.preset)
    run_dir.write_status(
        status="starting",
        launched=time.time(),
        resume=resume,
        exit_code=None,
        ended=None,
        stop_requested=None,
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(run_dir.stdout_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sftop.engine.supervisor", str(run_dir.path)]
            + (["--resume"] if resume else [])
            + (["--", *command] if command else []),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            env=env,
        )
    # The supervisor records its own pid: a second writer here could race its first write
    # (status.json is read-merge-written) and put back a stale "starting".
    _launched.append(proc)
    return run_dir


def last_terminal_event(run_dir: RunDir, since: float = 0.0) -> dict | None:
    """The newest ending record written at or after `since`: a resumed run's events still hold
    the earlier attempt's ending, which says nothing about this one."""
    records, _ = read_events(run_dir.events)
    for record in reversed(records):
        if record.get("type") in TERMINAL_TYPES:
            return record if float(record.get("time") or 0.0) >= since else None
    return None


def _last_step(run_dir: RunDir) -> int | None:
    records, _ = read_events(run_dir.events)
    for record in reversed(records):
        if isinstance(record.get("step"), int):
            return record["step"]
    return None


def choose_gpu(env: dict[str, str]) -> dict[str, str]:
    """With several GPUs visible, pin the trainer to the one with the most free memory.

    The planner plans for that GPU; pinning it (by UUID, immune to index reordering) makes it
    cuda:0 inside the trainer, so the plan and the device agree. A user's own
    CUDA_VISIBLE_DEVICES is always respected.
    """
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return {}
    from sftop.engine.gpu import read_gpus

    status = read_gpus()  # never raises: without NVML it has no GPUs, and the trainer sees what there is
    if len(status.gpus) < 2:
        return {}
    best = status.best()
    if best is None or not best.uuid:
        return {}
    return {"CUDA_VISIBLE_DEVICES": best.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def _own_process_group() -> dict[str, Any]:
    """Popen arguments that start the child in a new process group of its own.

    `process_group=` exists from Python 3.11; on 3.10 the child calls setpgid itself before exec.
    """
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


def supervise(run_dir: RunDir, resume: bool = False, command: list[str] | None = None) -> int:
    """Run the trainer to completion and record the outcome. Returns the final exit code."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cmd = command or trainer_command(run_dir, resume)
    started = time.time()
    # The trainer gets its own process group so `stop` can signal it and any workers it forks
    # without also signalling this supervisor (which must live on to record the outcome).
    from sftop.engine.errors import SftopError
    from sftop.engine.launch import failure_reason, prepare_launch, signal_ranks

    try:
        # plan.gpus selects several processes: `accelerate launch` starts them (sftop.engine.launch)
        launch = prepare_launch(run_dir, cmd)
    except SftopError as exc:
        with EventWriter(run_dir.events) as writer:
            writer.write(RunFailed(step=None, reason=str(exc)))
        run_dir.write_status(status="failed", exit_code=exc.exit_code, ended=time.time())
        return exc.exit_code
    several = launch is not None and launch.world_size > 1
    pinned = launch.env if launch else choose_gpu(dict(os.environ))
    if launch:
        cmd = launch.command
    # SFTOP_SUPERVISED: the trainer leaves status.json to this supervisor (sftop.engine.runs.run_in_foreground)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SFTOP_SUPERVISED="1", **pinned)
    env.update(allocator_env(env))  # read when CUDA initialises: before the trainer's first import of torch
    # The run's lock, taken here and shared with the trainer: one trainer per run directory.
    lock_fd = run_lock_acquire(run_dir.path)
    env[LOCK_FD_ENV] = str(lock_fd)
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, pass_fds=(lock_fd,), **_own_process_group())
    run_dir.write_status(
        status="running",
        supervisor_pid=os.getpid(),
        supervisor_start=process_start_time(os.getpid()),
        supervisor_session=os.getsid(0),
        pid=child.pid,
        pgid=child.pid,
        trainer_start=process_start_time(child.pid),
        started=started,
        command=cmd,
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        world_size=launch.world_size if launch else 1,
    )

    def forward(signum, _frame):
        # only while active: a signal arriving after the final status must not replace it
        run_dir.write_status(only_from=ACTIVE_STATUSES, status="stopping", stop_requested=time.time())
        if several:  # every rank saves its part of the checkpoint, then they stop together
            signal_ranks(run_dir, signum)
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            continue

    terminal = last_terminal_event(run_dir, since=started)
    if launch is not None and several and launch.first_rank:
        from sftop.engine.launch import node_terminal_event

        terminal = node_terminal_event(run_dir, launch, since=started)
    if terminal is not None:
        status = TERMINAL_STATUS[terminal["type"]]
    else:
        status = "failed"
        if launch is not None and several:
            reason = failure_reason(run_dir, launch, code)
        elif code < 0:
            reason = f"The trainer was killed by signal {signal.Signals(-code).name}"
        else:
            reason = f"The trainer exited with code {code} without finishing"
        latest = run_dir.latest_checkpoint()
        with EventWriter(run_dir.events) as writer:
            writer.write(
                RunFailed(
                    step=_last_step(run_dir),
                    reason=reason if several else reason + f"; see {run_dir.stdout_log}",
                    checkpoint=str(latest) if latest else None,
                )
            )
    # Free the directory before saying the run ended: whoever sees the final status may resume it at once.
    run_lock_release(run_dir.path)
    run_dir.write_status(status=status, exit_code=code, ended=time.time())
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = None
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1 :] or None
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    if len(args) != 1:
        print("usage: python -m sftop.engine.supervisor RUN_DIR [--resume] [-- TRAINER COMMAND...]", file=sys.stderr)
        return 2
    run_dir = RunDir(Path(args[0]).resolve())
    try:
        code = supervise(run_dir, resume=resume, command=command)
    except RunLockedError as exc:  # another trainer won the race since launch_run checked: leave its run alone
        print(f"sftop: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # the supervisor itself failed: leave a readable record behind
        run_dir.write_status(status="failed", ended=time.time(), supervisor_error=repr(exc))
        with EventWriter(run_dir.events) as writer:
            writer.write(RunFailed(step=None, reason=f"The run supervisor failed: {exc!r}"))
        raise
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
