"""What is live on the GPU at a training step's memory peak, by the code that allocated it.

Builds the model step_bench.py builds (same shapes, LoRA, checkpointing, patch), records the CUDA
caching allocator's history over warm-up steps (the first step runs eagerly, the second captures
the CUDA graphs when they are on: both allocate what a step needs), then replays the recorded
allocations and frees to find the moment the most bytes were live, and lists those blocks grouped
by the innermost sftop frame (else the innermost frame outside torch) that allocated them.

Recording stacks slows the step down: this says where memory goes, never how fast anything is.

  python benchmarks/memory_peak.py --model llama-3.1-8b --4bit --batch 2 --checkpointing offload

Vision shapes take step_bench.py's image batches.  `--unrecorded 2 --steps 1` records one replayed
step only: the live blocks at its peak are what sits outside the graphs' pools, and each pool's
reservation is listed beside them.

  python benchmarks/memory_peak.py --model qwen2.5-vl-3b --4bit --batch 4 --seq 1024 \
      --checkpointing offload --unrecorded 2 --steps 1 --frames 3

`--frames N` also groups the live blocks by their innermost N frames outside torch, so a block that
a library allocates inside a call of sftop's (the backbone's own eager work before the graphs) is
named by the library's line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_bench
import vlm_shapes


def _where(frames: list[dict]) -> str:
    """The innermost sftop frame, else the innermost frame outside torch/python internals."""
    for f in frames:
        if "/sftop/" in f["filename"]:
            return f"{f['filename'].split('/sftop/')[-1]}:{f['line']} {f['name']}"
    for f in frames:
        if _outside_torch(f):
            return f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
    return frames[0]["name"] if frames else "?"


def _outside_torch(f: dict) -> bool:
    """A frame of neither torch nor Python's standard library.  Judged by the path inside the
    environment's packages folder, since the environment itself may live under a folder named
    `torch` or `python3.x` (a venv in /opt/torch/.venv/lib/python3.12/site-packages), whose
    libraries' frames (transformers') are exactly what --frames is for."""
    name = f["filename"]
    if name.startswith("<"):
        return False
    for root in ("/site-packages/", "/dist-packages/"):
        if root in name:
            return not name.rsplit(root, 1)[-1].startswith("torch/")
    return "/torch/" not in name and "/python3" not in name


def _short(filename: str) -> str:
    """A frame's file relative to its package root: `transformers/...`, `sftop/...`."""
    for root in ("/sftop/", "/site-packages/", "/dist-packages/"):
        if root in filename:
            rest = filename.rsplit(root, 1)[-1]
            return f"sftop/{rest}" if root == "/sftop/" else rest
    return filename.split("/")[-1]


def _stack(frames: list[dict], depth: int) -> str:
    """The innermost `depth` frames outside torch's and Python's own code, innermost first: which
    library line allocated a block, and what of sftop's called it."""
    kept = [f for f in frames if _outside_torch(f)][:depth]
    return " < ".join(f"{_short(f['filename'])}:{f['line']}" for f in kept) or "?"


def peak_blocks(trace: list[dict], depth: int = 0) -> tuple[int, int, dict[str, int]]:
    """(peak live bytes, index of that event, {allocation site: live bytes at the peak}); sites are
    the innermost sftop frame (`_where`), or with `depth` the innermost `depth` frames (`_stack`)."""
    live, total, peak, at = {}, 0, -1, 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, at = total, i
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    sites: dict[str, int] = {}
    blocks: dict[int, dict] = {}
    for ev in trace[: at + 1]:
        if ev["action"] == "alloc":
            blocks[ev["addr"]] = ev
        elif ev["action"] in ("free_requested", "free_completed"):
            blocks.pop(ev["addr"], None)
    for ev in blocks.values():
        frames = ev.get("frames", [])
        key = _stack(frames, depth) if depth else _where(frames)
        sites[key] = sites.get(key, 0) + ev["size"]
    return peak, at, dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def pool_reservations(segments: list[dict]) -> dict[str, dict[str, int]]:
    """Reserved and allocated bytes of each memory pool at the snapshot: "default" for the ordinary
    cache, the pool's id for a CUDA graphs' private pool (which keeps its blocks between replays)."""
    out: dict[str, dict[str, int]] = {}
    for seg in segments:
        pool_id = tuple(seg.get("segment_pool_id", (0, 0)))
        name = "default" if pool_id == (0, 0) else f"graphs{pool_id}"
        entry = out.setdefault(name, {"reserved": 0, "allocated": 0})
        entry["reserved"] += seg["total_size"]
        entry["allocated"] += seg["allocated_size"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted([*step_bench.SHAPES, *vlm_shapes.SHAPES]), default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2, help="recorded steps (eager, then the capture)")
    ap.add_argument(
        "--unrecorded",
        type=int,
        default=0,
        help="steps run before recording starts: 2 records only replays, where the graphs' pools are "
        "reserved already and what the trace shows is the memory outside them",
    )
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    ap.add_argument(
        "--path",
        default="sftop",
        choices=["stock", "sftop", "sftop-eager", "sftop-small-loss-chunk", "sftop-stock-merge"],
    )
    ap.add_argument("--checkpointing", choices=["on", "offload"], default="offload")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--frames",
        type=int,
        default=0,
        help="also list the live blocks by their innermost N frames outside torch (transformers' own "
        "lines included), to split a site that allocates inside a library call",
    )
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    args.device = "cuda"
    args.frozen_tower = False

    import torch

    tmp = None
    if args.four_bit:
        tmp = step_bench.random_checkpoint(args.model, "cuda")
        args.model_dir = tmp.name
    model, report = step_bench._build(args, args.path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    gen = torch.Generator(device="cuda").manual_seed(1)
    step, _make_batch = step_bench.training_step(model, opt, args, gen)

    for _ in range(args.unrecorded):
        step()
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [ev for dev in snap["device_traces"] for ev in dev]
    peak, at, sites = peak_blocks(trace)
    pools = pool_reservations(snap["segments"])
    stacks = peak_blocks(trace, args.frames)[2] if args.frames else {}
    mib = 2**20
    result = dict(
        model=args.model,
        four_bit=args.four_bit,
        path=args.path,
        batch=args.batch,
        seq=args.seq,
        allocated_before_mib=round(steady / mib, 1),
        recorded_peak_mib=round(peak / mib, 1),
        peak_event=at,
        events=len(trace),
        patch=report,
        live_at_peak_mib={k: round(v / mib, 1) for k, v in list(sites.items())[: args.top]},
        pools_mib={k: {n: round(b / mib, 1) for n, b in v.items()} for k, v in pools.items()},
        live_at_peak_by_stack_mib={k: round(v / mib, 1) for k, v in list(stacks.items())[: args.top]},
        graphs=step_bench._graph_stats(model),
    )
    print(
        f"{args.model} {'nf4' if args.four_bit else 'bf16'} {args.path}: {result['allocated_before_mib']} MiB "
        f"before the steps; {result['recorded_peak_mib']} MiB of blocks allocated during them live at the "
        f"peak (event {at} of {len(trace)})"
    )
    for site, size in result["live_at_peak_mib"].items():
        print(f"  {size:9.1f} MiB  {site}")
    if stacks:
        print(f"  by their innermost {args.frames} frames outside torch:")
    for site, size in result["live_at_peak_by_stack_mib"].items():
        print(f"  {size:9.1f} MiB  {site}")
    for pool, sizes in result["pools_mib"].items():
        print(f"  pool {pool}: {sizes['reserved']} MiB reserved, {sizes['allocated']} MiB of it allocated at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
