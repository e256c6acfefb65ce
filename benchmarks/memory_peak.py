"""What is alive on the GPU at the peak of one training step, and who allocated it (GPU only).

Builds the same model as benchmarks/step_bench.py (stock or sftop path, bf16 or NF4), runs warm-up
steps, then records the CUDA caching allocator's history over one more step.  The trace is replayed
to find the moment of peak allocated memory; every block alive then is attributed to the innermost
Python frame in sftop, peft, transformers or the benchmark, and the groups are printed by size.

  python benchmarks/memory_peak.py --model llama-3.2-1b --path sftop [--4bit] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_bench  # noqa: E402  (same model build as the step benchmark)

MIB = 2**20
_OWN = ("sftop/", "peft/", "transformers/", "benchmarks/", "torch/utils/checkpoint", "torch/optim")


def _site(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if any(tag in name for tag in _OWN):
            short = name.split("site-packages/")[-1].split("/work/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(no python frame)"


def peak_breakdown(snapshot: dict, device: int = 0) -> dict:
    """Replay alloc/free events of one device; return the peak and the live blocks grouped by site."""
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    # blocks allocated before recording began are alive throughout: weights, optimizer state
    base = sum(seg["allocated_size"] for seg in snapshot["segments"] if seg.get("device", 0) == device)
    current = 0
    peak, peak_live, peak_at = -1, {}, -1
    for i, ev in enumerate(trace):
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _site(ev.get("frames", [])))
            current += size
            if current > peak:
                peak, peak_live, peak_at = current, dict(live), i
        elif action == "free_completed" and addr in live:
            current -= live.pop(addr)[0]
    groups: dict[str, int] = defaultdict(int)
    for size, site in peak_live.values():
        groups[site] += size
    # blocks freed during the step but allocated before recording: counted in `base`, approx.
    return dict(
        peak_transient_mib=round(peak / MIB, 1),
        at_event=peak_at,
        events=len(trace),
        end_of_step_allocated_mib=round(base / MIB, 1),
        top=[(round(v / MIB, 1), k) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:25]],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(step_bench.SHAPES), default="llama-3.2-1b")
    ap.add_argument("--path", choices=["stock", "sftop"], default="sftop")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    ap.add_argument("--checkpointing", choices=["on", "offload"], default="on")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import tempfile

    import torch

    args.device = "cuda"
    tmp = None
    if args.four_bit:
        from transformers import AutoModelForCausalLM

        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(step_bench._config(args.model), dtype=torch.bfloat16).save_pretrained(tmp.name)
        args.model_dir = tmp.name
    model, report = step_bench._build(args, args.path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    vocab = model.config.vocab_size

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    weights_etc = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = peak_breakdown(snap)
    out.update(
        model=args.model, path=args.path, four_bit=args.four_bit, batch=args.batch, seq=args.seq,
        checkpointing=args.checkpointing, patch=report,
        resident_between_steps_mib=round(weights_etc / MIB, 1),
        max_allocated_mib=round(torch.cuda.max_memory_allocated() / MIB, 1),
    )
    print(f"{args.model} {args.path} {'nf4' if args.four_bit else 'bf16'} {args.batch}x{args.seq} "
          f"checkpointing {args.checkpointing}: max allocated {out['max_allocated_mib']:.0f} MiB = resident "
          f"{out['resident_between_steps_mib']:.0f} + transient peak {out['peak_transient_mib']:.0f}")
    for mib, site in out["top"]:
        print(f"  {mib:9.1f} MiB  {site}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
