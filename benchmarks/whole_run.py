"""Whole runs on mixed-length chat data: `sftop run` vs TRL SFTTrainer + PEFT's usual recipe (GPU).

Both paths train the same random-init Llama-3.2-1B-shaped model (LoRA r=16, alpha 16, all linear
layers, lr 2e-4, one epoch) on the same generated chat rows: log-normal token lengths with median
~300 and mean ~420, capped at 2048, 300 rows, 8 rows per optimizer step.

- trl:   SFTTrainer + peft_config, per-device batch 2 x accumulation 4, padded batches, gradient
         checkpointing, TRL's default loss (the recipe docs/peers.md describes).
- sftop: `python -m sftop run PRESET --run-dir DIR`, effective_batch 8 with plan.* on "auto": the
         planner picks micro-batch, accumulation and checkpointing; rows are packed padding-free.

Each path runs in its own subprocess, one after the other, on the same GPU. Useful tokens are the
non-padding tokens of the dataset (every row's tokens); tokens/s divides them by the training time
(trainer.train() for TRL; first to last step event for sftop, which starts at on_train_begin).
Model build, data preparation and adapter saving are reported in wall time, not training time.

    python benchmarks/whole_run.py --out /tmp/whole          # a few minutes on an H100
    python benchmarks/whole_run.py --out /tmp/smoke --shape tiny --rows 24   # CPU smoke test

More `sftop run` configurations in the same call, each a row of the table (same data, same model,
same rows per optimizer step), for comparisons that must share one GPU and one day:

    --max-memory-gib 3.21                      # the default sftop row, under plan.max_memory_gib
    --length-buckets off                       # the default sftop row without bucketed CUDA graphs
    --variant capped plan.max_memory_gib=3.21  # an extra row: a name, then preset keys (--set KEY=V)
    --variant forced-8x1 plan.micro_batch=8 plan.gradient_checkpointing=offload

Writes whole_run.json and whole_run.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, tie_word_embeddings=False, max_position_embeddings=4096,
    ),
}
MEDIAN, MEAN, CAP = 300, 420, 2048
ANCHORS = {"trl_peft_tokens_s": 1816, "unsloth_tokens_s": 3396}  # docs/peers.md, one H100


# ---------------------------------------------------------------------------------------------- setup
def build_model_dir(path: Path, shape: str) -> Path:
    """A random-init model of the shape plus sftop's local demo tokenizer (no hub access)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftop.engine.models.demo import build_tokenizer

    if (path / "config.json").is_file():
        return path
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = CAP
    config = LlamaConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    return path


def make_rows(tokenizer, n: int, seed: int) -> tuple[list[dict], list[int]]:
    """Chat rows whose templated token counts follow a capped log-normal (median 300, mean 420)."""
    import random

    rng = random.Random(seed)
    sigma = math.sqrt(2 * math.log(MEAN / MEDIAN))  # mean/median of a log-normal = exp(sigma^2 / 2)
    rows, lengths = [], []
    overhead = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenize=True))
    for _ in range(n):
        target = int(min(CAP, max(overhead + 8, round(rng.lognormvariate(math.log(MEDIAN), sigma)))))
        body = target - overhead
        user_n = max(1, int(body * rng.uniform(0.2, 0.4)))
        assistant_n = max(1, body - user_n)
        digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731 - one token per digit
        for _attempt in range(4):  # the template's joins can merge or split a token or two: correct to the target
            messages = [{"role": "user", "content": digits(user_n)},
                        {"role": "assistant", "content": digits(assistant_n)}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if len(ids) == target or assistant_n + target - len(ids) < 1:
                break
            assistant_n += target - len(ids)
        rows.append({"messages": messages})
        lengths.append(len(ids))
    return rows, lengths


# ---------------------------------------------------------------------------------------------- trl
def trl_worker(model_dir: Path, data: Path, out: Path, seed: int) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    on_cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ids = []
    for row in rows:
        enc = tokenizer.apply_chat_template(row["messages"], tokenize=True)
        ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if on_cuda else torch.float32, attn_implementation="sdpa"
    )
    if on_cuda:
        model = model.cuda()
    args = SFTConfig(
        output_dir=str(out.parent / "trl-output"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        learning_rate=2e-4,
        num_train_epochs=1,
        bf16=on_cuda,
        max_length=CAP,
        packing=False,
        padding_free=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=not on_cuda,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    out.write_text(json.dumps({
        "train_s": train_s,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "steps": trainer.state.global_step,
        "useful_tokens": sum(len(x) for x in ids),
        "final_loss": result.training_loss,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
    }))


# ---------------------------------------------------------------------------------------------- sftop
def sftop_preset(model_dir: Path, data: Path, seed: int, effective_batch: int):
    from sftop.engine.presets.schema import Preset

    return Preset.model_validate({
        "name": "whole-run",
        "description": "benchmarks/whole_run.py",
        "model": {"name": str(model_dir)},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "data": {"source": str(data), "format": "messages", "max_length": CAP, "packing": True,
                 "loss_on": "assistant"},
        "train": {"epochs": 1, "learning_rate": 2e-4, "effective_batch": effective_batch, "seed": seed,
                  "logging_steps": 1, "save_steps": 100000, "save_total_limit": 1},
    })


def read_sftop_events(run_dir: Path) -> dict:
    from sftop.engine.events import iter_events

    started = steps = finished = failed = None
    steps = []
    for event in iter_events(run_dir / "events.jsonl"):
        kind = event.get("type")
        if kind == "run_started":
            started = event
        elif kind == "step":
            steps.append(event)
        elif kind == "run_finished":
            finished = event
        elif kind == "run_failed":
            failed = event
    result: dict = {"steps": len(steps)}
    if failed:
        result["failed"] = failed.get("reason")
    if started:
        result["plan"] = started.get("plan")
        result["kernels"] = started.get("kernels")
        result["data"] = started.get("data")
    if started and steps:
        result["train_s"] = steps[-1]["time"] - started["time"]
        result["tokens_seen"] = steps[-1].get("tokens_seen")
        peaks = [s.get("gpu_mem_peak_gib") for s in steps if s.get("gpu_mem_peak_gib") is not None]
        result["peak_allocated_gib"] = max(peaks) if peaks else None
        reserved = [s.get("gpu_mem_reserved_gib") for s in steps if s.get("gpu_mem_reserved_gib") is not None]
        result["peak_reserved_gib"] = max(reserved) if reserved else None  # + the CUDA context = the device's
        # per-step rates show stalls (JIT compiles, allocator growth) that the mean hides
        rates = [s.get("tokens_per_s") for s in steps if s.get("tokens_per_s")]
        result["step_tokens_per_s"] = rates
        if len(rates) > 2:
            rest = sorted(rates[1:])
            result["step_tokens_per_s_median"] = rest[len(rest) // 2]
            result["step_tokens_per_s_min"] = rest[0]
        result["final_loss"] = steps[-1].get("loss")
    if finished:
        result["runtime_s"] = finished.get("runtime_s")
    return result


def run_sftop(preset_path: Path, run_dir: Path, sets: list[str], env: dict, out: Path, data_tokens: int) -> dict:
    """`sftop run` of the benchmark preset with `--set` overrides, in its own process; its measurements."""
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "sftop", "run", str(preset_path), "--run-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    t1 = time.time()
    done = subprocess.run(command, env={**env, "SFTOP_HOME": str(out / "sftop-home")})
    sftop = read_sftop_events(run_dir) if (run_dir / "events.jsonl").is_file() else {}
    sftop["exit_code"] = done.returncode
    sftop["wall_s"] = time.time() - t1
    sftop["overrides"] = sets
    # Useful tokens: the rows' own tokens (sftop skips none here: every row fits max_length). The
    # trainer's own count (tokens_seen, bucket padding excluded) is kept beside it as a check.
    sftop["useful_tokens"] = data_tokens
    if sftop.get("train_s"):
        sftop["useful_tokens_per_s"] = data_tokens / sftop["train_s"]
    return sftop


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip", nargs="*", default=[], choices=["trl", "sftop"])
    ap.add_argument("--max-memory-gib", type=float, default=None,
                    help="run the sftop row under plan.max_memory_gib (e.g. a peer's measured peak)")
    ap.add_argument("--length-buckets", choices=["auto", "on", "off"], default=None,
                    help="train.length_buckets for the sftop row (off: packed batches as they come, no bucketed graphs)")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=V"),
                    help="an extra sftop row: a name, then preset overrides as `sftop run --set` takes them")
    ap.add_argument("--trl-worker", nargs=3, metavar=("MODEL_DIR", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(Path(args.trl_worker[0]), Path(args.trl_worker[1]), Path(args.trl_worker[2]), args.seed)
        return 0

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir = build_model_dir(out / f"model-{args.shape}", args.shape)
    print(f"model ready in {time.time() - t0:.1f}s: {model_dir}", flush=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, lengths = make_rows(tokenizer, args.rows, args.seed)
    data = out / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ordered = sorted(lengths)
    data_stats = {
        "rows": len(lengths), "tokens": sum(lengths), "median": ordered[len(ordered) // 2],
        "mean": round(sum(lengths) / len(lengths), 1), "max": ordered[-1],
    }
    print("data:", data_stats, flush=True)
    report: dict = {"shape": args.shape, "effective_batch": args.effective_batch, "data": data_stats,
                    "anchors_h100": ANCHORS}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    if "trl" not in args.skip:
        result_path = out / "trl-result.json"
        result_path.unlink(missing_ok=True)
        t1 = time.time()
        done = subprocess.run([sys.executable, __file__, "--out", str(out), "--seed", str(args.seed),
                               "--trl-worker", str(model_dir), str(data), str(result_path)], env=env)
        trl = json.loads(result_path.read_text()) if result_path.is_file() else {"failed": f"exit {done.returncode}"}
        trl["wall_s"] = time.time() - t1
        if "train_s" in trl:
            trl["useful_tokens_per_s"] = trl["useful_tokens"] / trl["train_s"]
        report["trl"] = trl
        print("trl:", trl, flush=True)

    runs: list[tuple[str, list[str]]] = []
    if "sftop" not in args.skip:
        main_sets = []
        if args.max_memory_gib is not None:
            main_sets.append(f"plan.max_memory_gib={args.max_memory_gib}")
        if args.length_buckets is not None:
            main_sets.append(f'train.length_buckets="{args.length_buckets}"')
        runs.append(("sftop", main_sets))
    for name, *sets in args.variant:
        runs.append((f"sftop:{name}", sets))
    if runs:
        from sftop.engine.presets.loader import save_preset

        preset_path = save_preset(sftop_preset(model_dir, data, args.seed, args.effective_batch), out / "whole-run.toml")
    for name, sets in runs:
        sftop = run_sftop(preset_path, out / name.replace(":", "-"), sets, env, out, data_stats["tokens"])
        report[name] = sftop
        print(f"{name}:", {k: v for k, v in sftop.items() if k not in ("plan", "data", "kernels", "step_tokens_per_s")},
              flush=True)
    report["sftop_rows"] = [name for name, _ in runs]

    for name in ("trl", *report["sftop_rows"]):
        r = report.get(name)
        if r and r.get("steps"):
            # The comparison is only fair at the same rows per optimizer step; show it so a drift is seen.
            r["rows_per_step"] = round(data_stats["rows"] / r["steps"], 2)
    trl_rate = report.get("trl", {}).get("useful_tokens_per_s")
    sftop_rate = report.get("sftop", {}).get("useful_tokens_per_s")
    if trl_rate and sftop_rate:
        report["speedup_vs_trl"] = sftop_rate / trl_rate
    (out / "whole_run.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(out, report)
    return 0


def write_markdown(out: Path, report: dict) -> None:
    d = report["data"]
    lines = [
        f"{d['rows']} chat rows, {d['tokens']} tokens (median {d['median']}, mean {d['mean']}, max {d['max']}), "
        f"{report['shape']} shape, LoRA r=16 all-linear, {report['effective_batch']} rows per optimizer step.",
        "",
        "| path | useful tokens/s | train time s | wall s | peak allocated GiB | steps | rows/step | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("trl", *report.get("sftop_rows", ["sftop"])):
        r = report.get(name)
        if not r:
            continue
        rate = r.get("useful_tokens_per_s")
        plan = r.get("plan") or {}
        plan_text = (
            f"micro-batch {plan.get('micro_batch')} x {plan.get('grad_accum')}, checkpointing "
            f"{plan.get('gradient_checkpointing')}"
            + (f" (1 in {plan['checkpoint_every_n_layers']} blocks)" if plan.get("checkpoint_every_n_layers", 1) > 1 else "")
            + (f", split by tokens (<= {plan['tokens_per_micro_batch']:,})" if plan.get("split_by") == "tokens" else "")
            + (f", cap {plan['max_memory_gib']:.2f} GiB" if plan.get("max_memory_gib") is not None else "")
            + (f", --set {' '.join(r['overrides'])}" if r.get("overrides") else "")
            if plan else ("batch 2 x 4, padded, checkpointing" if name == "trl" else "")
        )
        peak = r.get("peak_allocated_gib")
        lines.append(
            f"| {name} | {rate:,.0f} | {r.get('train_s', float('nan')):.1f} | {r.get('wall_s', float('nan')):.1f} | "
            f"{'' if peak is None else f'{peak:.2f}'} | {r.get('steps', '')} | {r.get('rows_per_step', '')} | {plan_text}"
            f"{' FAILED: ' + str(r['failed']) if r.get('failed') else ''} |"
            if rate else f"| {name} | failed | | {r.get('wall_s', 0):.1f} | | | | {r.get('failed', '')} |"
        )
        steps_expected = math.ceil(d["rows"] / report["effective_batch"])
        if r.get("steps") and r["steps"] != steps_expected:
            lines.append(f"| | | | | | | | WARNING: {r['steps']} steps, expected {steps_expected} at "
                         f"{report['effective_batch']} rows per step: not the same effective batch |")
    if "speedup_vs_trl" in report:
        lines += ["", f"sftop / TRL useful tokens/s: {report['speedup_vs_trl']:.2f}x "
                      "(target: at least 7.5x; the peers on one H100, docs/peers.md: TRL+PEFT 1,816, Unsloth 3,396)."]
    (out / "whole_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
