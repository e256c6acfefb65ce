"""The standard benchmark set on one GPU, and the table docs/benchmarks.md shows.

In order, each result written under --out:

1. the GPU-only tests (`pytest -m gpu`: CUDA graph replay, offloaded-checkpoint gradients, packed
   attention backward, the NF4 direct path, the compiled RMSNorm backward): numbers from a tree
   whose GPU paths are wrong are worth nothing, so a failure stops here unless --keep-going;
2. the step benchmark (benchmarks/step_bench.py), stock Hugging Face + PEFT against sftop, for
   each shape and weight type: step_<shape>_<weights>.json;
3. a whole one-epoch run on mixed-length chat data, TRL's usual recipe against `sftop run`
   (benchmarks/whole_run.py): whole/;
4. the planner's predicted peak memory against the measured one (benchmarks/planner_accuracy.py):
   planner/.

Then it prints the summary table (also written to summary.md). `--summarise DIR` prints the table
of results already in DIR without running anything.

    python benchmarks/run_all.py --out results/today                 # about 30 minutes on an H100
    python benchmarks/run_all.py --out results/today --only step --steps llama-3.2-1b:bf16
    python benchmarks/run_all.py --summarise results/today
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("tests", "step", "whole", "planner")
# shape:weights:batch, the shapes and batches docs/benchmarks.md and docs/peers.md report
STEP_RUNS = ("llama-3.2-1b:bf16:4", "llama-3.2-1b:nf4:4", "llama-3.1-8b:bf16:2", "llama-3.1-8b:nf4:2")
SHAPE_NAMES = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3.1-8b": "Llama-3.1-8B", "qwen2.5-1.5b": "Qwen2.5-1.5B"}


def _run(cmd: list[str], log: Path, timeout: float | None) -> int:
    print("$", " ".join(cmd), flush=True)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=HERE.parent).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"timed out after {timeout:.0f} s\n")
            return 124


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run_all.log"
    py = sys.executable
    if "tests" in args.only:
        code = _run([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], log, None)
        print(f"GPU tests: {'passed' if code == 0 else f'FAILED (exit {code}), see {log}'}", flush=True)
        if code != 0 and not args.keep_going:
            return code
    if "step" in args.only:
        for spec in args.steps:
            shape, weights, batch = (spec.split(":") + ["4"])[:3]
            cmd = [
                py,
                str(HERE / "step_bench.py"),
                "--model",
                shape,
                "--batch",
                batch,
                "--seq",
                "2048",
                "--steps",
                str(args.step_count),
                "--warmup",
                "3",
                "--checkpointing",
                "offload",
                "--json",
                str(out / f"step_{shape}_{weights}.json"),
            ]
            _run(cmd + (["--4bit"] if weights == "nf4" else []), log, args.timeout)
    if "whole" in args.only:
        _run([py, str(HERE / "whole_run.py"), "--out", str(out / "whole")], log, args.timeout)
    if "planner" in args.only:
        _run([py, str(HERE / "planner_accuracy.py"), "--out", str(out / "planner")], log, args.timeout)
    table = summarise(out)
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


def step_rows(folder: Path) -> list[str]:
    """One table row per step-benchmark JSON in `folder` (as step_bench.py writes them)."""
    rows = []
    for path in sorted(folder.glob("step_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        by_path = {r["path"]: r for r in data["results"] if "tokens_per_s" in r}
        stock, ours = by_path.get("stock"), by_path.get("sftop")
        if stock is None or ours is None:
            rows.append(f"| {path.stem} | failed: see run_all.log | | | | |")
            continue
        name = (
            f"{SHAPE_NAMES.get(data['model'], data['model'])} {'NF4' if data['four_bit'] else 'bf16'}, "
            f"{data['batch']} x {data['seq']}"
        )
        rows.append(
            f"| {name} | {stock['tokens_per_s']:,.0f} | {ours['tokens_per_s']:,.0f} | "
            f"**{ours['tokens_per_s'] / stock['tokens_per_s']:.2f}x** | {stock['peak_gib']:.2f} | "
            f"**{ours['peak_gib']:.2f}** |"
        )
    return rows


def summarise(folder: Path) -> str:
    lines = []
    steps = step_rows(folder)
    if steps:
        lines += [
            "| shape, weights, batch | stock tok/s | sftop tok/s | x stock | stock peak GiB | sftop peak GiB |",
            "|---|---|---|---|---|---|",
            *steps,
            "",
        ]
    whole = folder / "whole" / "whole_run.json"
    if whole.is_file():
        w = json.loads(whole.read_text(encoding="utf-8"))
        lines += [
            "| whole run (one epoch, 8 rows per step) | useful tok/s | x TRL |",
            "|---|---|---|",
            f"| TRL SFTTrainer + PEFT recipe | {w['trl']['useful_tokens_per_s']:,.0f} | 1.00x |",
            f"| `sftop run` | {w['sftop']['useful_tokens_per_s']:,.0f} | **{w['speedup_vs_trl']:.2f}x** |",
            "",
        ]
    planner = folder / "planner" / "planner_accuracy.json"
    if planner.is_file():
        rows = [
            r
            for r in json.loads(planner.read_text(encoding="utf-8"))["rows"]
            if r.get("status") == "ok" and not r.get("plan_check")
        ]
        within = sum(abs(r["error_pct"]) <= 10 for r in rows)
        under = sum(r["error_pct"] < -5 for r in rows)
        lines += [
            f"planner: {within} of {len(rows)} measured peaks within +-10% of the prediction, "
            f"{under} more than 5% under it",
            "",
        ]
    return "\n".join(lines) if lines else f"no results in {folder}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for the results (created)")
    ap.add_argument("--summarise", type=Path, metavar="DIR", help="only print the table of the results in DIR")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    ap.add_argument(
        "--steps",
        nargs="+",
        default=list(STEP_RUNS),
        metavar="SHAPE:WEIGHTS:BATCH",
        help=f"step benchmarks to run (default: {' '.join(STEP_RUNS)})",
    )
    ap.add_argument("--step-count", type=int, default=6, help="timed steps per step benchmark, after 3 warm-up")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each benchmark may take")
    ap.add_argument("--keep-going", action="store_true", help="benchmark even when a GPU test fails")
    args = ap.parse_args(argv)
    if args.summarise is not None:
        print(summarise(args.summarise))
        return 0
    if args.out is None:
        ap.error("--out DIR is needed (or --summarise DIR)")
    started = time.time()
    code = run(args)
    print(f"done in {time.time() - started:.0f} s; results in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
