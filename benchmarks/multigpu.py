"""Data-parallel scaling: the same run on 1 GPU and on 2 (DDP through accelerate), same effective batch.

Trains a random-init model of the chosen shape (default: Llama-3.1-8B's, bf16 weights, LoRA r=16
on all linear layers) on generated chat rows (log-normal lengths, median ~300 tokens, packed), with
`plan.gpus = [0]` and then `plan.gpus = 2`, everything else equal, through `sftop run` (the second
starts two processes with `accelerate launch`). Reports:

- tokens/s of each (steady state: from the second step event to the last) and their ratio;
- the loss curves' largest relative difference (equal effective batch: they should agree to
  bf16 precision);
- for every GPU of the 2-GPU run, the planner's predicted peak (allocated) against the measured
  peak (torch's max allocated, from each rank's step events).

    python benchmarks/multigpu.py --out /tmp/multigpu                      # 2+ GPUs, a few minutes
    python benchmarks/multigpu.py --out /tmp/multigpu --shape llama-1b --rows 160   # quicker
    python benchmarks/multigpu.py --out /tmp/smoke --shape tiny --rows 32 --cpu      # CPU smoke test

Writes multigpu.json and multigpu.md to --out.

FSDP-QLoRA of a model that does not fit one GPU (`--fsdp-qlora GIB`): every GPU is held to GIB with
plan.max_memory_gib (the allocator refuses more, as a card of that size would). At 6.5 GiB the
Llama-3.1-8B shape's ~5.3 GiB of 4-bit weights (NF4 layers, bf16 embeddings and head) leave one
such GPU too little to train (the planner asks for ~7.3 GiB), and are more than the 80% of a GPU's
budget under which sftop quantizes on the GPU, so the ranks quantize in host memory and each GPU
receives only its half: the path of a model whose 4-bit weights exceed one GPU. Three runs, same
data and effective batch:

1. one GPU held to GIB: the planner must refuse it (QLoRA does not fit);
2. two GPUs held to GIB: the planner chooses FSDP2 (FSDP-QLoRA, Answer.AI's recipe at a smaller
   scale); it must run to completion, each rank's measured peak within its budget and near the plan's;
3. one GPU without the limit: QLoRA's reference curve, which run 2 must follow (bf16).

    python benchmarks/multigpu.py --out /tmp/fsdp-qlora --fsdp-qlora 6.5 --rows 64   # 2 GPUs, a few minutes

Writes fsdp_qlora.json and fsdp_qlora.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import whole_run  # noqa: E402 - the benchmarks share the model builder and the chat rows

whole_run.SHAPES.setdefault(
    "llama-8b",
    dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
)


def read_ranks(run_dir: Path) -> dict:
    from sftop.engine.events import read_events

    out = {}
    files = {
        0: run_dir / "events.jsonl",
        **{int(p.stem.split("-")[1]): p for p in (run_dir / "ranks").glob("rank-*.jsonl") if p.stem != "rank-0"},
    }
    for rank, path in sorted(files.items()):
        records, _ = read_events(path)
        steps = [r for r in records if r.get("type") == "step"]
        peaks = [s["gpu_mem_peak_gib"] for s in steps if s.get("gpu_mem_peak_gib") is not None]
        out[rank] = {"measured_peak_allocated_gib": max(peaks) if peaks else None, "steps": len(steps)}
    return out


def run(preset_path: Path, run_dir: Path, sets: list[str], out: Path) -> dict:
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "sftop", "run", str(preset_path), "--run-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    t0 = time.time()
    done = subprocess.run(command, env={**os.environ, "SFTOP_HOME": str(out / "sftop-home")})
    from sftop.engine.events import read_events

    records, _ = read_events(run_dir / "events.jsonl")
    steps = [r for r in records if r.get("type") == "step"]
    started = next((r for r in records if r.get("type") == "run_started"), {})
    result = {
        "exit_code": done.returncode,
        "wall_s": time.time() - t0,
        "sets": sets,
        "losses": [s.get("loss") for s in steps],
        "plan": started.get("plan"),
        "end": records[-1] if records else None,
        "ranks": read_ranks(run_dir),
    }
    if len(steps) > 2:
        a, b = steps[1], steps[-1]
        result["tokens_per_s"] = (b["tokens_seen"] - a["tokens_seen"]) / max(b["time"] - a["time"], 1e-9)
    return result


def fsdp_qlora(preset_path: Path, out: Path, cap_gib: float, shape: str) -> int:
    """The three runs of `--fsdp-qlora` (see the module's docstring); 0 when all three went as they must."""
    qlora = ["model.load_in_4bit=true"]
    capped = qlora + [f"plan.max_memory_gib={cap_gib}"]
    single = run(preset_path, out / "qlora-1gpu-capped", capped + ["plan.gpus=[0]"], out)
    sharded = run(preset_path, out / "qlora-fsdp2-capped", capped + ["plan.gpus=2"], out)
    reference = run(preset_path, out / "qlora-1gpu", qlora + ["plan.gpus=[0]"], out)
    plan = sharded.get("plan") or {}
    end = single.get("end") or {}
    refused = single["exit_code"] != 0 and end.get("type") == "run_failed" and "does not fit" in str(end.get("reason"))
    pairs = [(a, b) for a, b in zip(reference["losses"], sharded["losses"]) if a is not None and b is not None]
    report = {
        "shape": shape,
        "cap_gib": cap_gib,
        "one_gpu_refused": refused,
        "one_gpu_reason": end.get("reason"),
        "fsdp2_exit_code": sharded["exit_code"],
        "fsdp2_end": sharded.get("end"),
        "strategy": plan.get("strategy"),
        "plan_notes": plan.get("notes"),
        "weights_gib": (plan.get("breakdown") or {}).get("weights"),
        "steps": len(sharded["losses"]),
        "tokens_per_s": sharded.get("tokens_per_s"),
        "reference_tokens_per_s": reference.get("tokens_per_s"),
        "loss_max_rel_diff": max((abs(a - b) / max(abs(a), 1e-9) for a, b in pairs), default=None),
        "per_gpu": [
            {
                "rank": rank,
                "predicted_allocated_gib": plan.get("predicted_allocated_gib"),
                "budget_gib": (plan.get("per_gpu") or [{}])[min(rank, len(plan.get("per_gpu") or [{}]) - 1)].get(
                    "budget_gib"
                ),
                "measured_peak_allocated_gib": info["measured_peak_allocated_gib"],
            }
            for rank, info in sorted(sharded["ranks"].items())
        ],
        "runs": {"one_capped": single, "fsdp2_capped": sharded, "one_reference": reference},
    }
    (out / "fsdp_qlora.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = [
        f"# FSDP-QLoRA, {shape} in 4-bit ({report['weights_gib']} GiB of weights), GPUs held to {cap_gib:g} GiB",
        "",
        f"one GPU held to {cap_gib:g} GiB: {'refused by the planner' if refused else 'NOT refused'} "
        f"({report['one_gpu_reason']})",
        f"two GPUs held to {cap_gib:g} GiB: strategy {report['strategy']}, exit {sharded['exit_code']}, "
        f"{report['steps']} steps, {report['tokens_per_s'] or 0:.0f} tokens/s "
        f"(one unlimited GPU: {report['reference_tokens_per_s'] or 0:.0f})",
        f"loss curve against one unlimited GPU: largest relative difference {report['loss_max_rel_diff']}",
        "",
        "| rank | predicted allocated GiB | measured peak GiB | budget GiB |",
        "|---|---|---|---|",
    ]
    for g in report["per_gpu"]:
        lines.append(
            f"| {g['rank']} | {g['predicted_allocated_gib']} | {g['measured_peak_allocated_gib']} | {g['budget_gib']} |"
        )
    lines += ["", "Plan notes:"] + [f"- {n}" for n in report["plan_notes"] or []]
    (out / "fsdp_qlora.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    ok = refused and sharded["exit_code"] == 0 and report["strategy"] == "fsdp2" and reference["exit_code"] == 0
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shape", default="llama-8b", choices=list(whole_run.SHAPES))
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cpu", action="store_true", help="smoke test without GPUs: 1 and 2 CPU processes (gloo)")
    ap.add_argument(
        "--fsdp-qlora",
        type=float,
        metavar="GIB",
        help="FSDP-QLoRA of a model whose 4-bit weights do not fit one GPU held to GIB (default shape llama-8b)",
    )
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from sftop.engine.models.demo import build_tokenizer
    from sftop.engine.presets import save_preset

    model_dir = whole_run.build_model_dir(out / f"model-{args.shape}", args.shape)
    import torch

    if torch.cuda.is_available():
        # the model was built on GPU 0: give its memory back, or the runs see that GPU as in use
        torch.cuda.empty_cache()
    rows, lengths = whole_run.make_rows(build_tokenizer(), args.rows, args.seed)
    data = out / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    preset = whole_run.sftop_preset(model_dir, data, args.seed, args.effective_batch)
    preset_path = save_preset(preset, out / "preset.toml")
    if args.fsdp_qlora:
        return fsdp_qlora(preset_path, out, args.fsdp_qlora, args.shape)

    cpu = ['plan.device="cpu"'] if args.cpu else []
    one = run(preset_path, out / "run-1gpu", cpu + (["plan.gpus=1"] if args.cpu else ["plan.gpus=[0]"]), out)
    two = run(preset_path, out / "run-2gpu", cpu + ["plan.gpus=2"], out)
    report = {"shape": args.shape, "rows": args.rows, "effective_batch": args.effective_batch, "one": one, "two": two}
    if one.get("tokens_per_s") and two.get("tokens_per_s"):
        report["scaling"] = two["tokens_per_s"] / one["tokens_per_s"]
    pairs = [(a, b) for a, b in zip(one["losses"], two["losses"]) if a is not None and b is not None]
    report["loss_max_rel_diff"] = max((abs(a - b) / max(abs(a), 1e-9) for a, b in pairs), default=None)
    plan = two.get("plan") or {}
    report["per_gpu"] = [
        {
            "rank": rank,
            "predicted_allocated_gib": plan.get("predicted_allocated_gib"),
            "measured_peak_allocated_gib": info["measured_peak_allocated_gib"],
            "error": (plan["predicted_allocated_gib"] / info["measured_peak_allocated_gib"] - 1)
            if plan.get("predicted_allocated_gib") and info["measured_peak_allocated_gib"]
            else None,
        }
        for rank, info in sorted(two["ranks"].items())
    ]
    (out / "multigpu.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = [
        f"# DDP scaling, {args.shape}, effective batch {args.effective_batch}",
        "",
        "| run | exit | tokens/s | plan |",
        "|---|---|---|---|",
    ]
    for name, r in (("1 GPU", one), ("2 GPUs", two)):
        p = r.get("plan") or {}
        lines.append(
            f"| {name} | {r['exit_code']} | {r.get('tokens_per_s', 0):.0f} | "
            f"{p.get('strategy')} {p.get('micro_batch')}x{p.get('grad_accum')}x{p.get('world_size')} |"
        )
    lines += [
        "",
        f"scaling (2 GPUs / 1): {report.get('scaling', float('nan')):.2f}x (target >= 1.9)",
        f"loss curves: largest relative difference {report['loss_max_rel_diff']}",
        "",
        "| rank | predicted allocated GiB | measured peak GiB | error |",
        "|---|---|---|---|",
    ]
    for g in report["per_gpu"]:
        err = f"{g['error']:+.1%}" if g["error"] is not None else "n/a"
        lines.append(f"| {g['rank']} | {g['predicted_allocated_gib']} | {g['measured_peak_allocated_gib']} | {err} |")
    (out / "multigpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if one["exit_code"] == two["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
