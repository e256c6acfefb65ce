"""Start a run as several processes with `accelerate launch`, and read how it ended.

The supervisor (sftop.engine.supervisor) calls `prepare_launch` with the trainer command it would
run. When `plan.gpus` selects more than one process, the command becomes

    python -m accelerate.commands.launch --config_file RUN_DIR/accelerate.yaml --num_processes N \
        -m sftop run PRESET --run-dir RUN_DIR [--resume]

with the chosen GPUs in CUDA_VISIBLE_DEVICES. The config and a `launch.sh` that repeats the
launch by hand (same environment, same command) are written into the run directory.

Each rank writes `ranks/rank-N.pid` and its own events to `ranks/rank-N.jsonl` (rank 0 writes the
run's `events.jsonl`): every rank's memory is in its file. A rank that fails records its
`run_failed` in its own file; the supervisor writes the run's single `run_failed`, naming the rank
whose failure came first and was not a consequence of another rank's (a peer that vanished).
torchrun stops the other ranks when one dies, and its summary names a rank killed by a signal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftop.engine.events import read_events
from sftop.engine.gpu_select import DISTRIBUTED_ENV, PINNED_ENV, GpuSelection, select_gpus
from sftop.engine.rundir import RunDir
from sftop.engine.runlock import HELD_ENV, LOCK_NAME

CONFIG_NAME = "accelerate.yaml"
SCRIPT_NAME = "launch.sh"
RANKS_DIR = "ranks"
STOP_FILE = ("control", "stop")
# Seconds a collective may wait for the other ranks before the run fails (a hung rank); a rank
# that dies is noticed at once (its connections close). SFTOP_DDP_TIMEOUT overrides it.
DDP_TIMEOUT_S = 600
# Words of an error that only says another rank went away: not the root cause.
_PEER_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "gloo",
    "nccl",
    "distbackenderror",
    "disterror",
    "socket timeout",
    "timed out",
    "watchdog",
    "recv",
    "send",
)


def ranks_dir(run_dir: RunDir) -> Path:
    return run_dir.path / RANKS_DIR


def rank_events_path(run_dir: RunDir, rank: int) -> Path:
    return ranks_dir(run_dir) / f"rank-{rank}.jsonl"


def rank_pid_path(run_dir: RunDir, rank: int) -> Path:
    return ranks_dir(run_dir) / f"rank-{rank}.pid"


def stop_file(run_dir: RunDir) -> Path:
    return run_dir.path.joinpath(*STOP_FILE)


def ddp_timeout_s() -> int:
    raw = os.environ.get("SFTOP_DDP_TIMEOUT", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DDP_TIMEOUT_S


@dataclass
class Launch:
    """A multi-process run's command, environment, and the files that describe it."""

    selection: GpuSelection
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    log_offset: int = 0  # stdout.log's size at launch: the launcher's summary comes after it

    @property
    def world_size(self) -> int:
        """Processes over every node."""
        return self.selection.total

    @property
    def first_rank(self) -> int:
        """The global rank of this node's first process: its events are this node's record."""
        return self.selection.node_rank * self.selection.world_size


def accelerate_config(
    selection: GpuSelection,
    main_address: str | None = None,
    main_port: int = 29500,
    fsdp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """accelerate's config file for a data-parallel run of `selection` on this machine (one of
    `selection.nodes`; the main node listens on main_address:main_port); with `fsdp` (accelerate's
    fsdp_config, sftop.engine.train.fsdp.fsdp_section) a sharded FSDP2 run."""
    several_nodes = selection.nodes > 1
    return {
        "compute_environment": "LOCAL_MACHINE",
        # torchrun starts one process per rank; on the CPU they use gloo
        "distributed_type": "FSDP" if fsdp else "MULTI_GPU",
        **({"fsdp_config": fsdp} if fsdp else {}),
        "num_processes": selection.total,
        "num_machines": selection.nodes,
        "machine_rank": selection.node_rank,
        **({"main_process_ip": main_address} if several_nodes else {}),
        # one machine: a free port, so several runs on one machine never collide
        "main_process_port": main_port if several_nodes else 0,
        "gpu_ids": "all",  # the supervisor's CUDA_VISIBLE_DEVICES holds exactly the chosen GPUs
        "use_cpu": selection.device == "cpu",
        "mixed_precision": "no",  # the trainer's own bf16/fp16 settings decide
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "debug": False,
    }


def _yaml_value(value: Any) -> str:
    return (
        json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _dump_yaml(data: dict[str, Any]) -> str:
    lines = ["# accelerate config of this run (written by sftop); see launch.sh"]
    for key, value in data.items():
        if isinstance(value, dict):  # fsdp_config: one level of keys
            lines.append(f"{key}:")
            lines += [f"  {k}: {_yaml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def _resumes_fsdp_checkpoint(run_dir: RunDir, args: list[str]) -> bool:
    """Does this launch resume from an FSDP2 checkpoint (which only FSDP2 reads back)?"""
    if "--resume" not in args:
        return False
    from sftop.engine.train.trainer import is_fsdp_checkpoint

    latest = run_dir.latest_checkpoint()
    return latest is not None and is_fsdp_checkpoint(latest)


def launch_strategy(
    preset: Any, selection: GpuSelection, resuming_fsdp: bool = False
) -> tuple[str, dict[str, Any] | None]:
    """("ddp" | "fsdp2", accelerate's fsdp_config or None): plan.strategy, or with "auto" the
    planner's choice for these GPUs; FSDP2 for a resume from an FSDP2 checkpoint. Decided once
    here, so every rank runs the same strategy (each rank plans its share under the strategy its
    config says)."""
    from sftop.engine.planner.multi import plan_selection, wanted_strategy
    from sftop.engine.train.fsdp import fsdp_section

    strategy = "fsdp2" if resuming_fsdp else wanted_strategy(preset)
    model_config = None
    if strategy == "auto":
        from sftop.engine.planner import load_model_config

        try:
            model_config = load_model_config(preset)
            strategy = plan_selection(preset, model_config, selection).strategy
        except Exception:  # noqa: BLE001 - the ranks' own planning reports what does not fit, and why
            strategy = "ddp"
    if strategy != "fsdp2":
        return "ddp", None
    if model_config is None:
        from sftop.engine.planner import load_model_config

        model_config = load_model_config(preset)
    return "fsdp2", fsdp_section(model_config, bool(preset.model.load_in_4bit))


def _trainer_args(command: list[str]) -> list[str] | None:
    """The arguments after `python -m sftop` of a trainer command, or None for another program."""
    if len(command) >= 4 and command[1:3] == ["-m", "sftop"] and command[3] == "run":
        return command[3:]
    return None


def prepare_launch(run_dir: RunDir, command: list[str], env: dict[str, str] | None = None) -> Launch | None:
    """The multi-process launch of `command` (a `python -m sftop run PRESET ...`); for one process,
    the pinning to the GPU plan.gpus names, or None (the default pinning applies). Raises
    PresetError when plan.gpus cannot be met here."""
    args = _trainer_args(command)
    if args is None:
        return None
    from sftop.engine.presets import load_preset

    preset, _ = load_preset(args[1])
    selection = select_gpus(preset.plan)
    if selection.total == 1:
        if selection.device == "cuda" and preset.plan.gpus != "auto":
            # one GPU the preset names (plan.gpus = [2] or 1): pin the trainer to it, as a one-GPU run
            # is pinned to the freest one otherwise
            return Launch(
                selection=selection,
                command=command,
                env={"CUDA_VISIBLE_DEVICES": selection.uuids[0], "CUDA_DEVICE_ORDER": "PCI_BUS_ID", PINNED_ENV: "1"},
            )
        return None
    _, fsdp = launch_strategy(preset, selection, resuming_fsdp=_resumes_fsdp_checkpoint(run_dir, args))
    config = accelerate_config(selection, preset.plan.main_address, preset.plan.main_port, fsdp)
    config_path = run_dir.path / CONFIG_NAME
    config_path.write_text(_dump_yaml(config), encoding="utf-8")
    launch_cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
        "--num_processes",
        str(selection.total),
        "-m",
        "sftop",
        *args,
    ]
    rank_env = {
        DISTRIBUTED_ENV: selection.device,
        # sftop's CUDA graphs replay a captured step; DDP's gradient all-reduce hooks (FSDP2's gathers
        # and reduce-scatters) fire outside it and would be skipped on replay, so graphs stay off
        # under several processes.
        "SFTOP_CUDA_GRAPHS": "0",
        "CUDA_VISIBLE_DEVICES": ",".join(selection.uuids) if selection.device == "cuda" else "",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "SFTOP_DDP_TIMEOUT": str(ddp_timeout_s()),
        HELD_ENV: str((run_dir.path / LOCK_NAME).resolve()),
    }
    if selection.device == "cpu":
        rank_env["ACCELERATE_USE_CPU"] = "true"
        rank_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // selection.world_size)))
    _write_script(run_dir, rank_env, launch_cmd)
    ranks_dir(run_dir).mkdir(parents=True, exist_ok=True)
    for old in ranks_dir(run_dir).glob("rank-*.pid"):
        old.unlink(missing_ok=True)  # an earlier attempt's pids
    stop_file(run_dir).unlink(missing_ok=True)
    try:
        offset = run_dir.stdout_log.stat().st_size
    except OSError:
        offset = 0
    return Launch(selection=selection, command=launch_cmd, env=rank_env, config_path=config_path, log_offset=offset)


def _write_script(run_dir: RunDir, env: dict[str, str], command: list[str]) -> None:
    lines = ["#!/bin/sh", "# Repeats this run's launch by hand (the supervisor ran exactly this).", "set -e"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"export PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))}")
    lines.append(shlex.join(command))
    path = run_dir.path / SCRIPT_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o755)


def rank_pids(run_dir: RunDir) -> dict[int, int]:
    pids = {}
    for path in ranks_dir(run_dir).glob("rank-*.pid"):
        try:
            pids[int(path.stem.split("-")[1])] = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return pids


def signal_ranks(run_dir: RunDir, signum: int) -> list[int]:
    """Ask every rank to stop: a stop file (read by all ranks at each step, also by a rank not yet
    started) and the signal to each rank's process. The launcher itself is not signalled: it would
    kill the ranks after a grace period, perhaps in the middle of a checkpoint."""
    path = stop_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(signal.Signals(signum).name + "\n", encoding="utf-8")
    sent = []
    for rank, pid in sorted(rank_pids(run_dir).items()):
        try:
            os.kill(pid, signum)
            sent.append(rank)
        except (ProcessLookupError, PermissionError):
            continue
    return sent


def _is_peer_error(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in _PEER_WORDS)


_ROOT = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", re.M)


def launcher_failures(log_text: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each failed rank that torchrun's summary lists, root cause first."""
    root = log_text.rfind("Root Cause")
    text = log_text[root:] + log_text[:root] if root >= 0 else log_text
    seen: dict[int, int] = {}
    for m in _ROOT.finditer(text):
        seen.setdefault(int(m.group(1)), int(m.group(2)))
    return list(seen.items())


def failure_reason(run_dir: RunDir, launch: Launch, exit_code: int) -> str:
    """The run's `run_failed` reason: which rank failed first, and its error."""
    own: dict[int, dict] = {}
    for rank in range(launch.world_size):
        records, _ = read_events(rank_events_path(run_dir, rank))
        failed = [r for r in records if r.get("type") == "run_failed"]
        if failed:
            own[rank] = failed[-1]
    try:
        with open(run_dir.stdout_log, "rb") as fh:
            fh.seek(launch.log_offset)
            log = fh.read().decode("utf-8", "replace")
    except OSError:
        log = ""
    launched = launcher_failures(log)
    # A rank that died without a word (killed, a crash in native code): the root cause.
    for rank, code in launched:
        if rank not in own:
            how = (
                f"was killed by signal {signal.Signals(-code).name}"
                if code < 0 and -code in signal.valid_signals()
                else f"exited with code {code} without recording an error"
            )
            return f"rank {rank} of {launch.world_size} {how}; the other ranks were stopped. See {run_dir.stdout_log}"
    # Otherwise the earliest own failure that is not a lost peer, then the earliest of all.
    ordered = sorted(own.items(), key=lambda item: float(item[1].get("time") or 0.0))
    primary = [item for item in ordered if not _is_peer_error(str(item[1].get("reason", "")))] or ordered
    if primary:
        rank, record = primary[0]
        return f"rank {rank} of {launch.world_size} failed: {record.get('reason')}"
    return (
        f"the launcher (accelerate launch, {launch.world_size} processes) exited with code {exit_code} before "
        f"any rank recorded an error; see {run_dir.stdout_log}"
    )


def rank_memory(run_dir: RunDir) -> dict[int, dict[str, Any]]:
    """Each rank's latest memory reading (from its step events): rank -> the step record's memory fields."""
    out: dict[int, dict[str, Any]] = {}
    paths = {0: run_dir.events}
    for path in ranks_dir(run_dir).glob("rank-*.jsonl"):
        rank = int(path.stem.split("-")[1])
        if rank:  # rank 0's own file holds only its failure; its steps are in events.jsonl
            paths[rank] = path
    for rank, path in sorted(paths.items()):
        records, _ = read_events(path)
        steps = [r for r in records if r.get("type") == "step"]
        if steps:
            last = steps[-1]
            out[rank] = {
                k: last.get(k) for k in ("step", "gpu_mem_allocated_gib", "gpu_mem_reserved_gib", "gpu_mem_peak_gib")
            }
    return out


def several_processes(preset: Any) -> bool:
    """Does this preset start several processes here? (Never inside one of them.)"""
    if os.environ.get(DISTRIBUTED_ENV):
        return False
    return select_gpus(preset.plan).world_size > 1


def run_processes_here(run_dir: RunDir, preset: Any, resume: bool) -> int:
    """`sftop run` in a terminal with several processes: the supervisor's loop runs in this process
    (Ctrl-C and `sftop stop` reach every rank through it) and records the outcome as a detached run's."""
    from sftop.engine.presets import save_preset
    from sftop.engine.supervisor import supervise, trainer_command

    if resume and run_dir.preset.exists():
        from sftop.engine.train.resume_check import resume_preset_path

        path = resume_preset_path(run_dir)
    else:
        path = run_dir.preset
    save_preset(preset, path)
    code = supervise(run_dir, resume=resume, command=trainer_command(run_dir, resume, path))
    return 0 if code == 0 else 1


def node_terminal_event(run_dir: RunDir, launch: Launch, since: float) -> dict | None:
    """A node other than the main one keeps no events.jsonl of its own: its first rank's file
    holds how the run ended there."""
    from sftop.engine.events import TERMINAL_TYPES

    records, _ = read_events(rank_events_path(run_dir, launch.first_rank))
    for record in reversed(records):
        if record.get("type") in TERMINAL_TYPES:
            return record if float(record.get("time") or 0.0) >= since else None
    return None
