"""A torch profiler window over a few optimizer steps of a run, for benchmarks/whole_run.py --profile.

Why: a whole run reaches a fraction of the fixed-shape step's rate, and what fills the gap (the GPU
waiting on host syncs, per-step Python, launches, collation) only shows in a trace of the steps
themselves, in the trainer's own process (`sftop run` trains in a child process of its own).

How: the environment asks for it, so that neither presets nor the CLI change: SFTOP_PROFILE_STEPS
= "FIRST:COUNT" profiles optimizer steps FIRST..FIRST+COUNT-1 (1-based) and writes into
SFTOP_PROFILE_DIR (default: the run's directory) `profile.json`, a summary:
  * the window's wall time per step and the GPU's busy time per step (the union of every kernel's
    and copy's time on the device), hence the share of the step the GPU waits;
  * host syncs per step (CUDA runtime calls that block the host until the device catches up), each
    with the outermost operation that made it (`aten::item`, `aten::_local_scalar_dense`, ...);
  * the top host-side operations by their own CPU time, and the top GPU kernels;
and `trace.json.gz`, the whole trace for a trace viewer.  The profiler costs host time, so the
window's own rate is below the run's: benchmarks compare the GPU busy time with unprofiled steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from transformers import TrainerCallback

STEPS_ENV = "SFTOP_PROFILE_STEPS"
DIR_ENV = "SFTOP_PROFILE_DIR"
# "1": record Python stacks too, so that benchmarks/trace_gaps.py can name what the host ran while
# the GPU waited (they slow the host further: compare rates on an unprofiled run)
STACKS_ENV = "SFTOP_PROFILE_STACKS"
SUMMARY = "profile.json"
TRACE = "trace.json.gz"
# CUDA runtime calls that block the calling host thread until the device (or a stream) is done
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
TOP = 15


def requested_window(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(first step, step count) from SFTOP_PROFILE_STEPS, or None when not asked for."""
    raw = (os.environ if env is None else env).get(STEPS_ENV, "").strip()
    if not raw:
        return None
    try:
        first, count = (int(x) for x in raw.split(":"))
    except ValueError:
        raise ValueError(f'{STEPS_ENV}="{raw}": expected FIRST:COUNT, e.g. 20:4 (optimizer steps, 1-based)') from None
    if first < 1 or count < 1:
        raise ValueError(f'{STEPS_ENV}="{raw}": FIRST and COUNT must be at least 1')
    return first, count


def profiler_callback(run_dir: Path) -> StepProfiler | None:
    """The callback the environment asks for (None without SFTOP_PROFILE_STEPS)."""
    window = requested_window()
    if window is None:
        return None
    stacks = os.environ.get(STACKS_ENV, "").strip() == "1"
    return StepProfiler(*window, Path(os.environ.get(DIR_ENV) or run_dir), stacks=stacks)


class StepProfiler(TrainerCallback):
    def __init__(self, first: int, count: int, out_dir: Path, stacks: bool = False):
        self.first, self.count, self.out_dir = first, count, Path(out_dir)
        self.stacks = stacks
        self._prof: Any = None
        self._t0 = 0.0
        self.summary: dict | None = None

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._prof is not None or self.summary is not None or state.global_step != self.first - 1:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._sync()  # the window starts with nothing queued from earlier steps
        try:
            prof = profile(activities=activities, with_stack=self.stacks)
            prof.__enter__()
        except Exception as exc:  # noqa: BLE001 - a profiler that cannot start must not fail the run
            self._failed(exc)
            return
        self._prof = prof
        self._t0 = time.perf_counter()

    def _failed(self, exc: BaseException) -> None:
        self.summary = {"error": f"profiler: {type(exc).__name__}: {exc}"[:500]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / SUMMARY).write_text(json.dumps(self.summary, indent=1))

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None or state.global_step < self.first + self.count - 1:
            return
        self._sync()  # the window ends when its last step's work is done
        wall_s = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        steps = state.global_step - self.first + 1
        try:
            prof.__exit__(None, None, None)
            self.summary = {
                "steps": [self.first, state.global_step],
                "wall_ms_per_step": round(wall_s * 1e3 / steps, 3),
                **summarise(_kineto_events(prof), steps, wall_s),
                "top_host_ops": top_host_ops(prof, steps),
            }
        except Exception as exc:  # noqa: BLE001 - the run goes on; the summary says what failed
            self._failed(exc)
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            prof.export_chrome_trace(str(self.out_dir / TRACE))
            self.summary["trace"] = TRACE
        except Exception as exc:  # noqa: BLE001 - the summary is what matters; say why the trace is missing
            self.summary["trace_error"] = f"{type(exc).__name__}: {exc}"[:300]
        self.summary["stacks"] = self.stacks
        (self.out_dir / SUMMARY).write_text(json.dumps(self.summary, indent=1))

    def on_train_end(self, args, state, control, **kwargs):
        # a run shorter than the window: close the profiler without a summary
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None


# what the device itself runs (kernels, copies, fills); its annotations span them and are left out
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _kineto_events(prof) -> list[tuple[str, bool, int, int, int]]:
    """(name, on the device, start ns, end ns, host thread) of every traced event but the device's
    own annotations."""
    return device_events(prof.profiler.kineto_results.events())


def device_events(raw) -> list[tuple[str, bool, int, int, int]]:
    """`_kineto_events` for a list of torch's `_KinetoEvent`s.

    torch 2.12 and later name each event's activity (kernel, memcpy, user annotation, ...); older
    releases (2.11 included) only say which device an event ran on.  There the device's own
    annotations are told apart by name: each mirrors a host-side range of the same name
    (record_function, ProfilerStep#N), which a kernel or copy never shares."""
    events = list(raw)
    if events and not hasattr(events[0], "activity_type"):
        host_names = {e.name() for e in events if not str(e.device_type()).endswith("CUDA")}
        kinds = [
            ("gpu_user_annotation" if e.name() in host_names else "kernel")
            if str(e.device_type()).endswith("CUDA")
            else "cpu_op"
            for e in events
        ]
    else:
        kinds = [str(e.activity_type()) for e in events]
    out = []
    for e, kind in zip(events, kinds):
        if kind.startswith("gpu_") and kind not in DEVICE_ACTIVITIES:
            continue
        start = e.start_ns()
        out.append((e.name(), kind in DEVICE_ACTIVITIES, start, start + e.duration_ns(), e.start_thread_id()))
    return out


def busy_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """The length of the union of [start, end) intervals (kernels on several streams overlap)."""
    total, end = 0, None
    start_run = 0
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                total += end - start_run
            start_run, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start_run
    return total


def summarise(events: list[tuple[str, bool, int, int, int]], steps: int, wall_s: float) -> dict:
    """GPU busy time, host syncs (and what made each) and top kernels of a profiled window."""
    device = [(s, e) for _n, on_device, s, e, _t in events if on_device]
    busy_ms = busy_ns(device) / 1e6 / steps
    kernel_ms: dict[str, float] = {}
    for name, on_device, s, e, _t in events:
        if on_device:
            kernel_ms[name] = kernel_ms.get(name, 0.0) + (e - s) / 1e6
    host = sorted((s, -e, n, t) for n, on_device, s, e, t in events if not on_device)
    syncs: dict[str, int] = {}
    for s, neg_e, name, thread in host:
        if name not in SYNC_CALLS:
            continue
        # the outermost operation around the sync on its thread: what asked for the value
        outer = next(
            (
                n
                for s2, neg_e2, n, t2 in host
                if t2 == thread and s2 <= s and -neg_e2 >= -neg_e and n not in SYNC_CALLS and n != name
            ),
            "(no enclosing operation)",
        )
        label = f"{name} in {outer}"
        syncs[label] = syncs.get(label, 0) + 1
    # a copy from pageable host memory makes the host wait for everything queued before it, like a
    # sync, without a sync call: counted by kind (the device names them "Memcpy HtoD (Pageable ...)")
    copies: dict[str, int] = {}
    for name, on_device, _s, _e, _t in events:
        if on_device and name.startswith("Memcpy"):
            copies[name] = copies.get(name, 0) + 1
    wall_ms = wall_s * 1e3 / steps
    return {
        "copies_per_step": {k: round(v / steps, 2) for k, v in sorted(copies.items(), key=lambda kv: -kv[1])},
        "gpu_busy_ms_per_step": round(busy_ms, 3),
        "gpu_busy_share": round(busy_ms / wall_ms, 4) if wall_ms > 0 else None,
        "host_syncs_per_step": round(sum(syncs.values()) / steps, 2),
        "host_syncs_by_cause": {k: round(v / steps, 2) for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])},
        "top_gpu_kernels": [
            [k[:100], round(v / steps, 3)] for k, v in sorted(kernel_ms.items(), key=lambda kv: -kv[1])[:TOP]
        ],  # name, ms per step
    }


def top_host_ops(prof, steps: int) -> list[list]:
    """[name, own CPU ms per step, calls per step] of the host operations that cost the most."""
    rows = []
    for evt in prof.key_averages():
        if str(getattr(evt, "device_type", "CPU")).endswith("CPU") and evt.self_cpu_time_total > 0:
            rows.append([evt.key[:100], round(evt.self_cpu_time_total / 1e3 / steps, 3), round(evt.count / steps, 2)])
    rows.sort(key=lambda r: -r[1])
    return rows[:TOP]
