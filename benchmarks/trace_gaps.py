"""Where the GPU waits: the idle gaps in a torch profiler trace, and what the host ran in each.

A step's wall time minus the GPU's busy time is time the GPU had nothing queued.  The profiler's
per-operation totals do not say where that time sits, because what fills it is usually Python
(a library's bookkeeping between two launches, a read-back and what follows it), not one slow
operation.  This reads a Chrome trace that torch's profiler exported with Python stacks
(`profile(..., with_stack=True)`, then `export_chrome_trace`), finds every stretch where no kernel,
copy or memset ran on the device, and names the Python frames that were running on the host at the
middle of each.  Gaps are summed by their innermost frames, so a cost spread over many short
gaps (one per layer, one per micro-batch) shows as one line.

    python benchmarks/trace_gaps.py TRACE.json[.gz] [--min-ms 0.2] [--frames 4] [--top 15]

`benchmarks/dpo_step.py --profile --trace FILE` writes such a trace.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# frames that say nothing about who made the host busy: builtins, module-call plumbing, decorators
NOISE_PREFIXES = ("<built-in method", "threading.py")
NOISE_FUNCTIONS = ("_call_impl", "_wrapped_call_impl", "decorate_context")


def _noise(frame: str) -> bool:
    return frame.startswith(NOISE_PREFIXES) or frame.rsplit(": ", 1)[-1] in NOISE_FUNCTIONS


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def idle_gaps(events: list[dict], min_us: float) -> list[tuple[float, float]]:
    """[start, end) stretches (microseconds) between the first and the last device activity where
    none ran on any stream, at least `min_us` long."""
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in DEVICE_CATEGORIES
    )
    gaps = []
    end = None
    for a, b in spans:
        if end is not None and a - end >= min_us:
            gaps.append((end, a))
        end = b if end is None else max(end, b)
    return gaps


def main_thread(events: list[dict]):
    """The host thread that ran the most Python: the training loop's."""
    counts: dict = defaultdict(int)
    for e in events:
        if e.get("cat") == "python_function":
            counts[(e.get("pid"), e.get("tid"))] += 1
    return max(counts, key=lambda thread: counts[thread]) if counts else None


def stacks_at(events: list[dict], times: list[float]) -> list[list[dict]]:
    """For each instant in `times`, the host events (Python frames, operations, runtime calls) of
    the main thread covering it, outermost first.  One sweep: a thread's events nest, so the ones
    still open at an instant form a stack ordered by end time."""
    thread = main_thread(events)
    host = [
        e
        for e in events
        if e.get("cat") in ("python_function", "cpu_op", "cuda_runtime", "user_annotation")
        and (thread is None or (e.get("pid"), e.get("tid")) == thread)
    ]
    host.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    order = sorted(range(len(times)), key=lambda i: times[i])
    out: list[list[dict]] = [[] for _ in times]
    stack: list[dict] = []
    nxt = 0
    for i in order:
        t = times[i]
        while nxt < len(host) and float(host[nxt]["ts"]) <= t:
            e = host[nxt]
            while stack and float(stack[-1]["ts"]) + float(stack[-1]["dur"]) < float(e["ts"]):
                stack.pop()
            stack.append(e)
            nxt += 1
        while stack and float(stack[-1]["ts"]) + float(stack[-1]["dur"]) < t:
            stack.pop()
        out[i] = [e for e in stack if float(e["ts"]) + float(e["dur"]) >= t]
    return out


def frame_name(event: dict) -> str:
    name = str(event["name"])
    for marker in ("site-packages/", "dist-packages/"):
        if marker in name:
            name = name.split(marker, 1)[1]
    return name


def explain(path: Path, min_ms: float = 0.2, frames: int = 4, top: int = 15) -> dict:
    events = load_events(path)
    gaps = idle_gaps(events, min_ms * 1e3)
    by_frames: dict[str, list[float]] = defaultdict(list)
    largest = []
    for (a, b), covering in zip(gaps, stacks_at(events, [(a + b) / 2 for a, b in gaps])):
        stack = [frame_name(e) for e in covering if not _noise(frame_name(e))]
        key = " > ".join(stack[-frames:]) if stack else "(nothing on the host: between steps, or another thread)"
        by_frames[key].append((b - a) / 1e3)
        largest.append(((b - a) / 1e3, stack[-3 * frames :]))
    largest.sort(key=lambda g: -g[0])
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    first = min((float(e["ts"]) for e in device), default=0.0)
    last = max((float(e["ts"]) + float(e["dur"]) for e in device), default=0.0)
    return {
        "window_ms": round((last - first) / 1e3, 2),
        "idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 2),
        "gaps": len(gaps),
        "by_frames": [
            {"frames": k, "idle_ms": round(sum(v), 2), "gaps": len(v)}
            for k, v in sorted(by_frames.items(), key=lambda kv: -sum(kv[1]))[:top]
        ],
        "largest": [{"ms": round(ms, 2), "stack": stack} for ms, stack in largest[:top]],
    }


def report(summary: dict) -> str:
    lines = [
        f"GPU idle {summary['idle_ms']:.1f} ms of {summary['window_ms']:.1f} ms in {summary['gaps']} gaps; "
        "by what the host ran (innermost frames):"
    ]
    for row in summary["by_frames"]:
        lines.append(f"  {row['idle_ms']:8.2f} ms  {row['gaps']:4d} gaps  {row['frames']}")
    lines.append("largest gaps:")
    for gap in summary["largest"]:
        lines.append(f"  {gap['ms']:8.2f} ms  " + " > ".join(gap["stack"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="a Chrome trace from torch.profiler (with_stack=True), .json or .json.gz")
    ap.add_argument("--min-ms", type=float, default=0.2, help="shortest gap counted")
    ap.add_argument("--frames", type=int, default=4, help="innermost frames that name a gap")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args(argv)
    summary = explain(args.trace, args.min_ms, args.frames, args.top)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
