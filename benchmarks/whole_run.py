"""Whole runs on mixed-length chat data: `sftop run` vs TRL SFTTrainer + PEFT's usual recipe (GPU).

Both paths train the same random-init Llama-3.2-1B-shaped model (LoRA r=16, alpha 16, all linear
layers, lr 2e-4, one epoch) on the same generated chat rows: log-normal token lengths with median
~300 and mean ~420, capped at 2048, 300 rows, 8 rows per optimizer step.

- trl:   SFTTrainer + peft_config, per-device batch 2 x accumulation 4, padded batches, gradient
         checkpointing, TRL's default loss (the recipe docs/peers.md describes).
- sftop: `python -m sftop run PRESET --run-dir DIR`, effective_batch 8 with plan.* on "auto": the
         planner picks micro-batch, accumulation and checkpointing; rows are packed padding-free.
- unsloth-8x1, unsloth-2x4 (when --paths names them): Unsloth's recipe on the same tokens and the
         same saved checkpoint, FastLanguageModel (bf16, max_seq_length 2048), get_peft_model with
         its offloaded checkpointing ("unsloth"), TRL's SFTTrainer as Unsloth patches it with
         `padding_free=True`; per-device batch 8 x accumulation 1, or its guide's 2 x 4. Unsloth is
         imported first in a process of its own (benchmarks/unsloth_peer.py); where it cannot be
         imported the row says why and the others run. Unsloth accepts older TRL releases than
         sftop: --peer-pythonpath DIRS puts the folders holding Unsloth and that TRL first on the
         Unsloth rows' PYTHONPATH only. Each row's output goes to NAME.log in --out.

Each path runs in its own subprocess, one after the other, on the same GPU. Useful tokens are the
non-padding tokens of the dataset (every row's tokens); tokens/s divides them by the training time
(trainer.train() for TRL and Unsloth; first to last step event for sftop, which starts at
on_train_begin). Model build, data preparation and adapter saving are reported in wall time, not
training time. Peak memory is torch.cuda.max_memory_allocated over training (sftop: its step events).

    python benchmarks/whole_run.py --out /tmp/whole          # a few minutes on an H100
    python benchmarks/whole_run.py --out /tmp/smoke --shape tiny --rows 24   # CPU smoke test

More `sftop run` configurations in the same call, each a row of the table (same data, same model,
same rows per optimizer step), for comparisons that must share one GPU and one day:

    --max-memory-gib 3.21                      # the default sftop row, under plan.max_memory_gib
    --length-buckets off                       # the default sftop row without bucketed CUDA graphs
    --variant capped plan.max_memory_gib=3.21  # an extra row: a name, then preset keys (--set KEY=V)
    --variant forced-8x1 plan.micro_batch=8 plan.gradient_checkpointing=offload

Against Unsloth, in the same call (the table then shows each row's useful tokens/s over Unsloth
batch 8 x 1's, and the targets: at least 4x at the planner's choice, at least 2x under
plan.max_memory_gib equal to Unsloth 8x1's measured peak):

    python benchmarks/whole_run.py --out /tmp/whole --paths sftop,unsloth-8x1,unsloth-2x4 --cap-at-peer unsloth-8x1 --peer-pythonpath DIRS

`--cap-at-peer NAME` runs that Unsloth row first, then an sftop row `sftop:at-NAME-peak` under
plan.max_memory_gib = its measured peak (rounded down to 1/10,000 GiB). sftop's cap bounds its whole
device footprint, CUDA context included, the peer's peak its allocated memory only: `--cap-extra-gib
0 0.6` adds a second capped row with the 0.6 GiB context on top (`sftop:at-NAME-peak+0.6`).

`--step-reference` then times step_bench.py's fixed-shape step (sftop's path, every row full, CUDA
graphs as `sftop run` has them) at the sftop row's plan: its largest micro-batch in tokens as rows of
the data's longest length, the same checkpointing. The table ends with the whole run's useful
tokens/s as a share of that step's tokens/s, held to at least 80%, and both peaks.

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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import unsloth_peer  # noqa: E402 - Unsloth's process: imported first, offline, its own TRL
import bench_common  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
}
MEDIAN, MEAN, CAP = 300, 420, 2048
# Unsloth rows: per-device batch x gradient accumulation (8 rows per optimizer step either way)
PEER_ROWS = {"unsloth-8x1": (8, 1), "unsloth-2x4": (2, 4)}
ROWS = ("trl", "sftop", *PEER_ROWS)
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
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
    overhead = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenize=True
        )
    )
    for _ in range(n):
        target = int(min(CAP, max(overhead + 8, round(rng.lognormvariate(math.log(MEDIAN), sigma)))))
        body = target - overhead
        user_n = max(1, int(body * rng.uniform(0.2, 0.4)))
        assistant_n = max(1, body - user_n)
        digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731 - one token per digit
        for _attempt in range(4):  # the template's joins can merge or split a token or two: correct to the target
            messages = [
                {"role": "user", "content": digits(user_n)},
                {"role": "assistant", "content": digits(assistant_n)},
            ]
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            if len(ids) == target or assistant_n + target - len(ids) < 1:
                break
            assistant_n += target - len(ids)
        rows.append({"messages": messages})
        lengths.append(len(ids))
    return rows, lengths


def tokenised_rows(tokenizer, data: Path) -> list[list[int]]:
    """The chat rows as the peers' trainers get them: token ids through the model's chat template,
    made once here so that every peer trains on exactly the same tokens."""
    ids = []
    for line in data.read_text().splitlines():
        enc = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True)
        ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return ids


# ---------------------------------------------------------------------------------------------- trl
def trl_worker(model_dir: Path, data: Path, out: Path, seed: int) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    on_cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenised_rows(tokenizer, data)
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
        peft_config=LoraConfig(
            r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    out.write_text(json.dumps({**bench_common.timed_train(trainer), "useful_tokens": sum(len(x) for x in ids)}))


# ---------------------------------------------------------------------------------------------- unsloth
def unsloth_worker(model_dir: Path, data: Path, out: Path, seed: int, batch: int, accum: int) -> None:
    """Unsloth's recipe on the same tokens: FastLanguageModel (bf16, max_seq_length 2048), LoRA
    r=16 on the seven projections with its offloaded checkpointing, and TRL's SFTTrainer as Unsloth
    patches it, padding-free (`padding_free=True`: rows are concatenated, no padding, attention kept
    within each row). Writes {"unavailable": why} where Unsloth cannot be imported."""
    why = unsloth_peer.unavailable("FastLanguageModel")  # first: Unsloth patches TRL and transformers
    if why is not None:
        out.write_text(json.dumps({"unavailable": why}))
        return
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    on_cuda = torch.cuda.is_available()
    ids = tokenised_rows(AutoTokenizer.from_pretrained(model_dir), data)
    dataset = Dataset.from_list([{"input_ids": x} for x in ids])
    model, tokenizer = unsloth_peer.language_model(str(model_dir), CAP, four_bit=False)
    args = SFTConfig(
        output_dir=str(out.parent / f"{out.stem.removesuffix('-result')}-output"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=2e-4,
        num_train_epochs=1,
        bf16=on_cuda,
        # every row already fits CAP (the model's max_seq_length); TRL refuses a max_length it
        # cannot enforce on padding-free rows
        max_length=None,
        packing=False,
        padding_free=True,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=not on_cuda,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    out.write_text(
        json.dumps(
            {
                **bench_common.timed_train(trainer),
                "useful_tokens": sum(len(x) for x in ids),
                "batch": [batch, accum],
                "padding_free": bool(getattr(trainer.args, "padding_free", False)),
                "collator": type(trainer.data_collator).__name__,
                "versions": unsloth_peer.versions(),
            }
        )
    )


def run_unsloth(
    name: str, model_dir: Path, data: Path, out: Path, seed: int, peer_pythonpath: str, pythonpath: str
) -> dict:
    """One Unsloth row in its own process (its output in NAME.log); its measurements, or why it did not run."""
    batch, accum = PEER_ROWS[name]
    result_path = out / f"{name}-result.json"
    result_path.unlink(missing_ok=True)
    log = out / f"{name}.log"
    command = unsloth_peer.command(
        [
            sys.executable,
            __file__,
            "--out",
            str(out),
            "--seed",
            str(seed),
            "--unsloth-worker",
            str(model_dir),
            str(data),
            str(result_path),
            str(batch),
            str(accum),
        ],
        peer_pythonpath,
        pythonpath,
    )
    t1 = time.time()
    with log.open("w") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT)
    if result_path.is_file():
        row = json.loads(result_path.read_text())
    else:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        row = {"failed": f"exit {done.returncode}: {tail[0][:300] if tail else 'no output'} (whole output: {log})"}
    row["wall_s"] = time.time() - t1
    if "train_s" in row:
        row["useful_tokens_per_s"] = row["useful_tokens"] / row["train_s"]
    return row


def capped_row(report: dict, peer: str, extra_gib: float = 0.0) -> tuple[str, list[str]] | tuple[str, str]:
    """The sftop row held to `peer`'s measured peak (plan.max_memory_gib), or why it cannot run.

    The cap is the peak plus `extra_gib`, rounded down to 1/10,000 GiB: never above it. sftop's cap
    bounds its whole device footprint (CUDA context and allocator slack included) while the peer's
    peak is its allocated memory only, so a cap equal to that peak is the strict comparison."""
    name = f"sftop:at-{peer}-peak" + (f"+{extra_gib:g}" if extra_gib else "")
    peak = (report.get(peer) or {}).get("peak_allocated_gib")
    if not peak:
        return name, f"not run: {peer} has no measured peak ({_why_not(report.get(peer))})"
    # round() first: 3.21 + 0.6 is 3.8099999... in binary, which must still give 3.81
    return name, [f"plan.max_memory_gib={math.floor(round((peak + extra_gib) * 1e4, 6)) / 1e4}"]


def _why_not(row: dict | None) -> str:
    if not row:
        return "it did not run"
    if "unavailable" in row:
        return f"Unsloth cannot be imported: {row['unavailable']}"
    return str(row.get("failed") or "no GPU memory measured")


# ---------------------------------------------------------------------------------------------- sftop
def sftop_preset(model_dir: Path, data: Path, seed: int, effective_batch: int):
    from sftop.engine.presets.schema import Preset

    return Preset.model_validate(
        {
            "name": "whole-run",
            "description": "benchmarks/whole_run.py",
            "model": {"name": str(model_dir)},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
            "data": {
                "source": str(data),
                "format": "messages",
                "max_length": CAP,
                "packing": True,
                "loss_on": "assistant",
            },
            "train": {
                "epochs": 1,
                "learning_rate": 2e-4,
                "effective_batch": effective_batch,
                "seed": seed,
                "logging_steps": 1,
                "save_steps": 100000,
                "save_total_limit": 1,
            },
        }
    )


def read_sftop_events(run_dir: Path) -> dict:
    from sftop.engine.events import iter_events

    started = finished = failed = None
    steps: list[dict[str, Any]] = []
    plan_changes: list[str] = []
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
        elif kind == "plan_changed":  # an OOM mid-run or a probe over budget stepped the plan down
            plan_changes.append(f"step {event.get('step')}: {event.get('reason')}")
    # a step retried after a plan change is logged twice: count each step once
    result: dict = {"steps": len({s.get("step") for s in steps}), "step_events": len(steps)}
    if plan_changes:
        result["plan_changes"] = plan_changes
    if failed:
        result["failed"] = failed.get("reason")
    if started:
        result["plan"] = started.get("plan")
        result["kernels"] = started.get("kernels")
        result["data"] = started.get("data")
    if started and steps:
        result["train_s"] = steps[-1]["time"] - started["time"]
        result["tokens_seen"] = steps[-1].get("tokens_seen")
        peaks = [s["gpu_mem_peak_gib"] for s in steps if s.get("gpu_mem_peak_gib") is not None]
        result["peak_allocated_gib"] = max(peaks) if peaks else None
        reserved = [s["gpu_mem_reserved_gib"] for s in steps if s.get("gpu_mem_reserved_gib") is not None]
        result["peak_reserved_gib"] = max(reserved) if reserved else None  # + the CUDA context = the device's
        # per-step rates show stalls (JIT compiles, allocator growth) that the mean hides
        rates = [s["tokens_per_s"] for s in steps if s.get("tokens_per_s")]
        result["step_tokens_per_s"] = rates
        if len(rates) > 2:
            rest = sorted(rates[1:])
            result["step_tokens_per_s_median"] = rest[len(rest) // 2]
            result["step_tokens_per_s_min"] = rest[0]
        result["final_loss"] = steps[-1].get("loss")
    if finished:
        result["runtime_s"] = finished.get("runtime_s")
        if finished.get("graphs"):
            result["graphs"] = finished["graphs"]
    return result


def graphs_line(name: str, row: dict) -> str | None:
    """Where a row's CUDA graph captures went: a short run's rate depends on what they cost."""
    g = row.get("graphs")
    if not g:
        return None
    train_s = row.get("train_s")
    share = f" ({g['capture_s'] / train_s:.0%} of the train time)" if train_s else ""
    phases = ", ".join(f"{phase} {s:.2f} s" for phase, s in g["capture_s_by_phase"].items())
    return (
        f"{name} CUDA graphs: {g['captures']} captured in {g['capture_s']:.2f} s{share} ({phases}); "
        f"{g['replays']} replays, {g['eager_calls']} eager calls"
        + (f"; {len(g['failures'])} refused or failed: {g['failures'][0]}" if g["failures"] else "")
        + "."
    )


def run_sftop(
    preset_path: Path,
    run_dir: Path,
    sets: list[str],
    env: dict,
    out: Path,
    data_tokens: int,
    profile: tuple[int, int] | None = None,
    stacks: bool = False,
) -> dict:
    """`sftop run` of the benchmark preset with `--set` overrides, in its own process; its measurements.
    `profile`: (first step, steps) of a torch profiler window in the trainer (sftop/engine/train/profiling.py);
    `stacks`: with Python stacks, whose trace names what the host ran while the GPU waited (trace_gaps.py)."""
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "sftop", "run", str(preset_path), "--run-dir", str(run_dir)]
    for item in sets:
        command += ["--set", item]
    run_env = {**env, "SFTOP_HOME": str(out / "sftop-home")}
    profile_dir = run_dir.with_name(run_dir.name + "-profile")
    if profile is not None:
        from sftop.engine.train import profiling

        run_env[profiling.STEPS_ENV] = f"{profile[0]}:{profile[1]}"
        run_env[profiling.DIR_ENV] = str(profile_dir)
        if stacks:
            run_env[profiling.STACKS_ENV] = "1"
    t1 = time.time()
    done = subprocess.run(command, env=run_env)
    sftop = read_sftop_events(run_dir) if (run_dir / "events.jsonl").is_file() else {}
    if profile is not None:
        sftop["profile"] = read_profile(profile_dir, run_dir)
    sftop["exit_code"] = done.returncode
    sftop["wall_s"] = time.time() - t1
    sftop["overrides"] = sets
    # Useful tokens: the rows' own tokens (sftop skips none here: every row fits max_length). The
    # trainer's own count (tokens_seen, bucket padding excluded) is kept beside it as a check.
    sftop["useful_tokens"] = data_tokens
    if sftop.get("train_s") and finished_whole(sftop, done.returncode):
        sftop["useful_tokens_per_s"] = data_tokens / sftop["train_s"]
    return sftop


STEP_SHAPES = {"llama-1b": "llama-3.2-1b", "tiny": "tiny"}  # step_bench.py's names of the same shapes
TARGET_OF_STEP = 0.80  # a whole run's useful tokens/s over the fixed-shape step's, at the same plan


def reference_shape(plan: dict, longest: int = CAP) -> tuple[int, int, str] | str:
    """(batch, seq, checkpointing) of the fixed-shape step that matches a whole run's plan: its largest
    micro-batch in tokens as rows of the data's longest length (every row full, none padded), with
    the plan's checkpointing; or why there is none."""
    tokens = plan.get("tokens_per_micro_batch")
    if not tokens and plan.get("micro_batch"):
        tokens = plan["micro_batch"] * longest
    if not tokens:
        return "the plan names no micro-batch size"
    seq = min(longest, int(tokens))
    batch = max(1, round(tokens / seq))
    checkpointing = str(plan.get("gradient_checkpointing", "on"))
    if checkpointing not in ("on", "off", "offload"):
        return f"checkpointing {checkpointing!r} has no fixed-shape counterpart"
    return batch, seq, checkpointing


def run_step_reference(row: dict, shape: str, env: dict, out: Path, device: str = "cuda", longest: int = CAP) -> dict:
    """step_bench.py's sftop path at the whole run's plan, in its own process: the rate a whole run
    is held to (at least 80% of it, at the same plan and so about the same memory)."""
    found = reference_shape(row.get("plan") or {}, longest)
    if isinstance(found, str):
        return {"not_run": found}
    batch, seq, checkpointing = found
    result_path = out / "step-reference.json"
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "step_bench.py"),
        "--model",
        STEP_SHAPES[shape],
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        "12",
        "--warmup",
        "3",
        "--checkpointing",
        checkpointing,
        "--paths",
        "sftop",
        "--device",
        device,
        "--json",
        str(result_path),
    ]
    done = subprocess.run(command, env=env)
    ref: dict[str, Any] = {"batch": batch, "seq": seq, "checkpointing": checkpointing}
    results = json.loads(result_path.read_text()).get("results", []) if result_path.is_file() else []
    step = next((r for r in results if r.get("path") == "sftop" and r.get("tokens_per_s")), None)
    if step is None:
        ref["failed"] = f"step_bench.py exit {done.returncode}"
        return ref
    ref.update(tokens_per_s=step["tokens_per_s"], peak_gib=step.get("peak_gib"), cuda_graphs=step.get("cuda_graphs"))
    rate = row.get("useful_tokens_per_s")
    if rate:
        ref["whole_over_step"] = rate / step["tokens_per_s"]
        ref["met"] = ref["whole_over_step"] >= TARGET_OF_STEP
    return ref


def step_reference_line(ref: dict, row: dict) -> str:
    where = f"{ref.get('batch')} x {ref.get('seq')}, checkpointing {ref.get('checkpointing')}"
    if "not_run" in ref:
        return f"Fixed-shape step reference: not run ({ref['not_run']})."
    if "whole_over_step" not in ref:
        return f"Fixed-shape step reference ({where}): {ref.get('failed', 'no rate')}."
    peak, run_peak = ref.get("peak_gib"), row.get("peak_allocated_gib")
    median = row.get("step_tokens_per_s_median")
    return (
        f"sftop whole run / fixed-shape step ({where}: {ref['tokens_per_s']:,.0f} tokens/s"
        + (f", peak {peak:.2f} GiB" if _measured(peak) else "")
        + (f"; the run's peak {run_peak:.2f} GiB" if _measured(run_peak) else "")
        + f"): {ref['whole_over_step']:.0%}, target at least {TARGET_OF_STEP:.0%}: {'met' if ref['met'] else 'MISSED'}."
        # what the run's steps reach once captured, without the captures and first steps around them
        + (
            f" Its median step: {median:,.0f} tokens/s, {median / ref['tokens_per_s']:.0%} of the fixed-shape step."
            if isinstance(median, (int, float)) and median > 0
            else ""
        )
    )


def _measured(gib) -> bool:
    """A memory figure that was measured (a CPU run has none: None or NaN)."""
    return isinstance(gib, (int, float)) and math.isfinite(gib)


def finished_whole(row: dict, returncode: int) -> bool:
    """Whether a run trained over all of its data: only then do the data's tokens over its training
    time make its rate (a run that failed after a few steps saw a fraction of them)."""
    return returncode == 0 and not row.get("failed")


def profile_window(steps: int, count: int = 4) -> tuple[int, int]:
    """(first step, steps) of a profiled window in the middle of a run of `steps` optimizer steps,
    past its first steps (CUDA graph captures, compiles)."""
    count = max(1, min(count, steps // 4 or 1))
    first = max(1, min(steps - count + 1, steps // 2 - count // 2))
    return first, count


def read_profile(profile_dir: Path, run_dir: Path) -> dict:
    """The trainer's profile summary, with the GPU's busy time set against steps the profiler did not
    slow down: GPU ms per 1,000 useful tokens in the window over wall ms per 1,000 of every other
    step (but the first, which compiles and captures)."""
    from sftop.engine.events import iter_events
    from sftop.engine.train.profiling import SUMMARY

    path = profile_dir / SUMMARY
    if not path.is_file():
        return {"missing": f"no {path} (the run ended before the window, or failed)"}
    summary = json.loads(path.read_text())
    if "error" in summary:
        return {"missing": summary["error"]}
    summary["dir"] = str(profile_dir)
    steps = [e for e in iter_events(run_dir / "events.jsonl") if e.get("type") == "step"]
    first, last = summary["steps"]
    seen = {e["step"]: (e["time"], e.get("tokens_seen") or 0) for e in steps}
    inside = outside_s = outside_tokens = 0.0
    for step in sorted(seen):
        if step - 1 not in seen:
            continue
        seconds, tokens = seen[step][0] - seen[step - 1][0], seen[step][1] - seen[step - 1][1]
        if first <= step <= last:
            inside += tokens
        elif step > 2:
            outside_s += seconds
            outside_tokens += tokens
    if inside and outside_tokens:
        gpu = summary["gpu_busy_ms_per_step"] * (last - first + 1) / inside * 1e3
        wall = outside_s * 1e3 / outside_tokens * 1e3
        summary["gpu_ms_per_1k_tokens"] = round(gpu, 3)
        summary["unprofiled_wall_ms_per_1k_tokens"] = round(wall, 3)
        summary["gpu_busy_share_unprofiled"] = round(gpu / wall, 4)
    trace = profile_dir / str(summary.get("trace", ""))
    if summary.get("stacks") and trace.is_file():
        import trace_gaps

        summary["idle_gaps"] = trace_gaps.explain(trace, frames=4, top=10)
    return summary


def profile_lines(name: str, profile: dict) -> list[str]:
    """The profiled window of one row, for the Markdown report."""
    if "missing" in profile:
        return [f"{name} profile: {profile['missing']}."]
    first, last = profile["steps"]
    lines = [
        f"{name} profile, optimizer steps {first}-{last}: the GPU busy {profile['gpu_busy_ms_per_step']:.1f} ms of a "
        f"{profile['wall_ms_per_step']:.1f} ms profiled step ({profile['gpu_busy_share']:.0%})"
        + (
            f"; against the unprofiled steps {profile['gpu_busy_share_unprofiled']:.0%} "
            f"({profile['gpu_ms_per_1k_tokens']:.1f} GPU ms vs {profile['unprofiled_wall_ms_per_1k_tokens']:.1f} wall ms "
            "per 1,000 useful tokens)"
            if "gpu_busy_share_unprofiled" in profile
            else ""
        )
        + f"; host syncs per step: {profile['host_syncs_per_step']:g}"
        + (
            " (" + ", ".join(f"{k} x{v:g}" for k, v in list(profile["host_syncs_by_cause"].items())[:5]) + ")"
            if profile["host_syncs_by_cause"]
            else ""
        )
        + (
            "; copies per step: " + ", ".join(f"{k} x{v:g}" for k, v in profile["copies_per_step"].items())
            if profile.get("copies_per_step")
            else ""
        )
        + ".",
        "Top host-side operations (own CPU ms per step, calls per step): "
        + "; ".join(f"{n} {ms:.2f} ms x{calls:g}" for n, ms, calls in profile["top_host_ops"][:8])
        + f". Trace: {profile.get('dir', '')}/{profile.get('trace', '(none)')}.",
    ]
    gaps = profile.get("idle_gaps")
    if gaps:
        lines.append(
            f"Where the GPU waited (Python stacks on, so the host ran slower than unprofiled): "
            f"{gaps['idle_ms']:.1f} ms idle in {gaps['gaps']} gaps over the window; by the host's innermost frames: "
            + "; ".join(f"{g['idle_ms']:.1f} ms in {g['gaps']} gaps: {g['frames']}" for g in gaps["by_frames"][:6])
            + "."
        )
    return lines


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "--paths",
        default="trl,sftop",
        help=f"comma-separated rows to run, among {', '.join(ROWS)} (default: trl,sftop)",
    )
    ap.add_argument("--peer-pythonpath", default="", help=unsloth_peer.HELP)
    ap.add_argument(
        "--cap-at-peer",
        choices=list(PEER_ROWS),
        default=None,
        help="run that Unsloth row first (added to --paths if missing), then one more sftop row "
        "under plan.max_memory_gib equal to its measured peak",
    )
    ap.add_argument(
        "--cap-extra-gib",
        type=float,
        nargs="+",
        default=[0.0],
        metavar="GIB",
        help="added to the peer's peak for --cap-at-peer, one capped row each (e.g. 0 0.6: 0.6 is the "
        "CUDA context; sftop's cap bounds its whole device footprint, the peer's peak counts "
        "allocated memory only)",
    )
    ap.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip", nargs="*", default=[], choices=list(ROWS), help="rows left out of --paths")
    ap.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="run the sftop row under plan.max_memory_gib (e.g. a peer's measured peak)",
    )
    ap.add_argument(
        "--length-buckets",
        choices=["auto", "on", "off"],
        default=None,
        help="train.length_buckets for the sftop row (off: packed batches as they come, no bucketed graphs)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile a few optimizer steps in the middle of the sftop row (torch profiler in the trainer's "
        "process): GPU busy vs wall time, host syncs per step and their causes, top host-side costs; "
        "the row's tokens/s then includes the profiler's overhead",
    )
    ap.add_argument(
        "--profile-stacks",
        action="store_true",
        help="with --profile: record Python stacks too and say what the host ran while the GPU waited "
        "(benchmarks/trace_gaps.py); slows the profiled steps further",
    )
    ap.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=V"),
        help="an extra sftop row: a name, then preset overrides as `sftop run --set` takes them",
    )
    ap.add_argument(
        "--step-reference",
        action="store_true",
        help="after the sftop row, time step_bench.py's fixed-shape step at that row's plan (its largest "
        "micro-batch as rows of the data's longest length, the same checkpointing) in the same command, "
        "and report the whole run's useful tokens/s as a share of it (target: at least 80%%)",
    )
    ap.add_argument("--trl-worker", nargs=3, metavar=("MODEL_DIR", "DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--unsloth-worker", nargs=5, metavar=("MODEL_DIR", "DATA", "OUT", "BATCH", "ACCUM"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    args.profile = args.profile or args.profile_stacks
    if args.trl_worker:
        trl_worker(Path(args.trl_worker[0]), Path(args.trl_worker[1]), Path(args.trl_worker[2]), args.seed)
        return 0
    if args.unsloth_worker:
        model_dir, data, out, batch, accum = args.unsloth_worker
        unsloth_worker(Path(model_dir), Path(data), Path(out), args.seed, int(batch), int(accum))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(ROWS))
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)} in --paths: choose among {', '.join(ROWS)}")
    if args.cap_at_peer and args.cap_at_peer not in paths:
        paths.append(args.cap_at_peer)
    paths = [p for p in paths if p not in args.skip]
    for peer in paths:
        if peer in PEER_ROWS and math.prod(PEER_ROWS[peer]) != args.effective_batch:
            ap.error(
                f"{peer} trains on {math.prod(PEER_ROWS[peer])} rows per optimizer step, not "
                f"--effective-batch {args.effective_batch}: the rows would not compare"
            )

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
    data_stats: dict[str, Any] = {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "median": ordered[len(ordered) // 2],
        "mean": round(sum(lengths) / len(lengths), 1),
        "max": ordered[-1],
    }
    print("data:", data_stats, flush=True)
    report: dict = {
        "shape": args.shape,
        "effective_batch": args.effective_batch,
        "data": data_stats,
        "anchors_h100": ANCHORS,
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    if "trl" in paths:
        result_path = out / "trl-result.json"
        result_path.unlink(missing_ok=True)
        t1 = time.time()
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--out",
                str(out),
                "--seed",
                str(args.seed),
                "--trl-worker",
                str(model_dir),
                str(data),
                str(result_path),
            ],
            env=env,
        )
        trl: dict[str, Any] = (
            json.loads(result_path.read_text()) if result_path.is_file() else {"failed": f"exit {done.returncode}"}
        )
        trl["wall_s"] = time.time() - t1
        if "train_s" in trl:
            trl["useful_tokens_per_s"] = trl["useful_tokens"] / trl["train_s"]
        report["trl"] = trl
        print("trl:", trl, flush=True)

    # the peers before sftop: a capped sftop row needs its peer's peak
    report["peer_rows"] = [name for name in PEER_ROWS if name in paths]
    for name in report["peer_rows"]:
        report[name] = run_unsloth(name, model_dir, data, out, args.seed, args.peer_pythonpath, env["PYTHONPATH"])
        print(f"{name}:", report[name], flush=True)

    runs: list[tuple[str, list[str]]] = []
    if "sftop" in paths:
        main_sets = []
        if args.max_memory_gib is not None:
            main_sets.append(f"plan.max_memory_gib={args.max_memory_gib}")
        if args.length_buckets is not None:
            main_sets.append(f'train.length_buckets="{args.length_buckets}"')
        runs.append(("sftop", main_sets))
    for extra in args.cap_extra_gib if args.cap_at_peer else []:
        name, sets_or_why = capped_row(report, args.cap_at_peer, extra)
        if isinstance(sets_or_why, str):
            report[name] = {"not_run": sets_or_why}
            print(f"{name}: {sets_or_why}", flush=True)
        else:
            runs.append((name, sets_or_why))
    for name, *sets in args.variant:
        runs.append((f"sftop:{name}", sets))
    if runs:
        from sftop.engine.presets.loader import save_preset

        preset_path = save_preset(
            sftop_preset(model_dir, data, args.seed, args.effective_batch), out / "whole-run.toml"
        )
    for name, sets in runs:
        window = profile_window(math.ceil(len(lengths) / args.effective_batch)) if args.profile else None
        sftop = run_sftop(
            preset_path,
            out / name.replace(":", "-"),
            sets,
            env,
            out,
            data_stats["tokens"],
            profile=window if name == "sftop" else None,
            stacks=args.profile_stacks,
        )
        report[name] = sftop
        print(
            f"{name}:",
            {k: v for k, v in sftop.items() if k not in ("plan", "data", "kernels", "step_tokens_per_s", "profile")},
            flush=True,
        )
    if args.step_reference and report.get("sftop", {}).get("plan"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU smoke test runs it too
        report["step_reference"] = run_step_reference(
            report["sftop"], args.shape, env, out, device=device, longest=data_stats["max"]
        )
        print("step_reference:", report["step_reference"], flush=True)
    report["sftop_rows"] = [name for name, _ in runs] + [
        n for n in report if n.startswith("sftop:") and "not_run" in report[n]
    ]

    for name in ("trl", *report["peer_rows"], *report["sftop_rows"]):
        r = report.get(name)
        if r and r.get("steps"):
            # The comparison is only fair at the same rows per optimizer step; show it so a drift is seen.
            r["rows_per_step"] = round(data_stats["rows"] / r["steps"], 2)
    trl_rate = report.get("trl", {}).get("useful_tokens_per_s")
    sftop_rate = report.get("sftop", {}).get("useful_tokens_per_s")
    if trl_rate and sftop_rate:
        report["speedup_vs_trl"] = sftop_rate / trl_rate
    compare_with_peer(report)
    (out / "whole_run.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(out, report)
    return 0


PEER_BASE = "unsloth-8x1"  # the row the targets are ratios of
TARGET_PLANNER, TARGET_AT_PEER_PEAK = 4.0, 2.0  # x Unsloth 8x1, on an 80 GB card


def compare_with_peer(report: dict) -> None:
    """Each row's useful tokens/s over Unsloth 8x1's, and the two targets: sftop at the planner's
    choice at least 4x, and sftop under plan.max_memory_gib = Unsloth 8x1's peak at least 2x."""
    base = (report.get(PEER_BASE) or {}).get("useful_tokens_per_s")
    if not base:
        return
    for name in ("trl", *report.get("peer_rows", []), *report.get("sftop_rows", [])):
        r = report.get(name) or {}
        if r.get("useful_tokens_per_s"):
            r["x_unsloth_8x1"] = r["useful_tokens_per_s"] / base
    targets = []
    sftop = report.get("sftop") or {}
    free = not any(o.startswith("plan.") for o in sftop.get("overrides", []))
    if sftop.get("x_unsloth_8x1") and free:
        targets.append(
            {
                "row": "sftop",
                "what": "planner's choice",
                "ratio": sftop["x_unsloth_8x1"],
                "target": TARGET_PLANNER,
                "met": sftop["x_unsloth_8x1"] >= TARGET_PLANNER,
            }
        )
    for capped_name in report.get("sftop_rows", []):
        capped = report.get(capped_name) or {}
        if not capped_name.startswith(f"sftop:at-{PEER_BASE}-peak") or not capped.get("x_unsloth_8x1"):
            continue
        cap = (capped.get("plan") or {}).get("max_memory_gib")
        peak = capped.get("peak_allocated_gib")
        extra = None if cap is None else cap - (report[PEER_BASE].get("peak_allocated_gib") or 0.0)
        what = f"plan.max_memory_gib = {PEER_BASE}'s peak" + (
            f" + {extra:.2f} GiB" if extra is not None and extra >= 0.005 else ""
        )
        targets.append(
            {
                "row": capped_name,
                "what": what,
                "cap_gib": cap,
                "peak_gib": peak,
                "ratio": capped["x_unsloth_8x1"],
                "target": TARGET_AT_PEER_PEAK,
                "met": capped["x_unsloth_8x1"] >= TARGET_AT_PEER_PEAK,
                "within_cap": None if cap is None or peak is None else peak <= cap,
            }
        )
    report["targets_vs_unsloth_8x1"] = targets


def _plan_text(name: str, r: dict) -> str:
    plan = r.get("plan") or {}
    if plan:
        return (
            f"micro-batch {plan.get('micro_batch')} x {plan.get('grad_accum')}, checkpointing "
            f"{plan.get('gradient_checkpointing')}"
            + (
                f" (1 in {plan['checkpoint_every_n_layers']} blocks)"
                if plan.get("checkpoint_every_n_layers", 1) > 1
                else ""
            )
            + (f", split by tokens (<= {plan['tokens_per_micro_batch']:,})" if plan.get("split_by") == "tokens" else "")
            + (f", cap {plan['max_memory_gib']:.2f} GiB" if plan.get("max_memory_gib") is not None else "")
            + (f", --set {' '.join(r['overrides'])}" if r.get("overrides") else "")
            + (", profiled (its rate includes the profiler's cost)" if r.get("profile") else "")
            + (f"; PLAN CHANGED {'; '.join(r['plan_changes'])}" if r.get("plan_changes") else "")
        )
    if name == "trl":
        return "batch 2 x 4, padded, checkpointing"
    if name in PEER_ROWS:
        batch, accum = PEER_ROWS[name]
        version = (r.get("versions") or {}).get("unsloth", "")
        padding = "padding-free" if r.get("padding_free") else "PADDED (padding-free refused)"
        return f"Unsloth {version} batch {batch} x {accum}, {padding}, checkpointing 'unsloth'".replace("  ", " ")
    return ""


def write_markdown(out: Path, report: dict) -> None:
    d = report["data"]
    vs_peer = bool((report.get(PEER_BASE) or {}).get("useful_tokens_per_s"))
    head = "| path | useful tokens/s | train time s | wall s | peak allocated GiB | steps | rows/step | plan |"
    lines = [
        f"{d['rows']} chat rows, {d['tokens']} tokens (median {d['median']}, mean {d['mean']}, max {d['max']}), "
        f"{report['shape']} shape, LoRA r=16 all-linear, {report['effective_batch']} rows per optimizer step.",
        "",
        head.replace(" useful tokens/s |", " useful tokens/s | x Unsloth 8x1 |") if vs_peer else head,
        "|---|---|---|---|---|---|---|---|" + ("---|" if vs_peer else ""),
    ]
    columns = 9 if vs_peer else 8
    for name in ("trl", *report.get("peer_rows", []), *report.get("sftop_rows", ["sftop"])):
        r = report.get(name)
        if not r:
            continue
        if "unavailable" in r or "not_run" in r:
            why = unsloth_peer.not_measured(r["unavailable"]) if "unavailable" in r else r["not_run"]
            lines.append(f"| {name} | {why} " + "| " * (columns - 2) + "|")
            continue
        rate = r.get("useful_tokens_per_s")
        ratio = (f" {r['x_unsloth_8x1']:.2f}x |" if "x_unsloth_8x1" in r else " |") if vs_peer else ""
        peak = r.get("peak_allocated_gib")
        lines.append(
            f"| {name} | {rate:,.0f} |{ratio} {r.get('train_s', float('nan')):.1f} | {r.get('wall_s', float('nan')):.1f} | "
            f"{'' if peak is None else f'{peak:.2f}'} | {r.get('steps', '')} | {r.get('rows_per_step', '')} | "
            f"{_plan_text(name, r)}{' FAILED: ' + str(r['failed']) if r.get('failed') else ''} |"
            if rate
            else f"| {name} | failed |{' |' if vs_peer else ''} | {r.get('wall_s', 0):.1f} | | | | {r.get('failed', '')} |"
        )
        steps_expected = math.ceil(d["rows"] / report["effective_batch"])
        if r.get("steps") and r["steps"] != steps_expected:
            lines.append(
                "| " * (columns - 1) + f"| WARNING: {r['steps']} steps, expected {steps_expected} at "
                f"{report['effective_batch']} rows per step: not the same effective batch |"
            )
    if "speedup_vs_trl" in report:
        lines += [
            "",
            f"sftop / TRL useful tokens/s: {report['speedup_vs_trl']:.2f}x "
            "(target: at least 7.5x; the peers on one H100, docs/peers.md: TRL+PEFT 1,816, Unsloth 3,396).",
        ]
    for name in report.get("sftop_rows", []):
        line = graphs_line(name, report.get(name) or {})
        if line:
            lines += ["", line]
    for name in report.get("sftop_rows", []):
        if (report.get(name) or {}).get("profile"):
            lines += ["", *profile_lines(name, report[name]["profile"])]
    if report.get("step_reference"):
        lines += ["", step_reference_line(report["step_reference"], report.get("sftop") or {})]
    targets = report.get("targets_vs_unsloth_8x1", [])
    if targets:
        lines.append("")
    for t in targets:
        memory = ""
        if "cap_gib" in t:
            memory = (
                f"; cap {t['cap_gib']:.2f} GiB, sftop's peak {t['peak_gib']:.2f} GiB"
                + ("" if t["within_cap"] is not False else " (OVER the cap)")
                if t["cap_gib"] is not None and t["peak_gib"] is not None
                else "; cap or peak not recorded"
            )
        lines.append(
            f"{t['row']} ({t['what']}) / Unsloth batch 8 x 1 useful tokens/s: {t['ratio']:.2f}x, target at "
            f"least {t['target']:g}x: {'met' if t['met'] else 'MISSED'}{memory}."
        )
    (out / "whole_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
