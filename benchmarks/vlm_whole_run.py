"""Whole vision-language runs on mixed image-text rows: `sftop run` vs TRL's VLM recipe (GPU).

Every path trains the same random-init Qwen2.5-VL-3B-shaped model (built once, saved to a local
directory with an offline processor: no hub) with LoRA r=16, alpha 16 on the language model's and
the vision tower's attention and MLP layers, lr 2e-4, one epoch, on the same generated rows: 1 to 4
images per row of mixed sizes (64 to 352 image tokens each), user and assistant turns of mixed
lengths (log-normal), 8 rows per optimizer step.

- trl:   SFTTrainer with TRL's own VLM collator (DataCollatorForVisionLanguageModeling, padded
         batches, `max_length=None` as the guides say), PEFT LoRA, per-device batch 2 x
         accumulation 4, gradient checkpointing (the recipe of TRL's and Hugging Face's VLM guides,
         scaled to 8 rows per step).
- sftop: `python -m sftop run PRESET --run-dir DIR`, effective_batch 8 with plan.* on "auto": the
         planner picks micro-batch, accumulation and checkpointing; rows are packed padding-free
         with per-sample 3-D positions.
- sftop:no-packing: the same with data.packing = false (padded batches): the packing gain on its own.

Each path runs in its own subprocess, one after the other, on the same GPU. Useful tokens are the
rows' own tokens with their image tokens (no padding), counted once by sftop's data check with the
same processor; TRL's collator's non-padding tokens are counted too, as a check. tokens/s divides
the useful tokens by the training time (trainer.train() for TRL; run_started to the last step for
sftop). Model build, data checks and adapter saving are in the wall time only.

    python benchmarks/vlm_whole_run.py --out /tmp/vlm-whole            # about 3-4 minutes on an H100
    python benchmarks/vlm_whole_run.py --out /tmp/vlm-whole --nf4      # every path on 4-bit NF4 weights
    python benchmarks/vlm_whole_run.py --out /tmp/smoke --shape qwen2.5-vl-tiny --rows 8 --effective-batch 4  # CPU

Writes vlm_whole_run.json and vlm_whole_run.md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from vlm_shapes import SHAPES  # noqa: E402
import bench_common  # noqa: E402
from whole_run import run_sftop  # noqa: E402

FAMILY = "qwen2_5_vl"
MODEL_SHAPES = ("qwen2.5-vl-3b", "qwen2.5-vl-tiny")
# (width, height) of the generated images: multiples of Qwen's 28-pixel merged patch within its
# default budget, so every path sees them as they are (64, 144, 256, 192, 352 and 162 image tokens)
IMAGE_SIZES = {
    "qwen2.5-vl-3b": [(224, 224), (336, 336), (448, 448), (448, 336), (616, 448), (252, 504)],
    "qwen2.5-vl-tiny": [(56, 56), (84, 56), (56, 112)],
}
# median text tokens of the user and the assistant turn (one token per digit with the offline tokenizer)
TEXT_MEDIANS = {"qwen2.5-vl-3b": (60, 160), "qwen2.5-vl-tiny": (6, 10)}
LORA_PARTS = ["language", "vision", "attention", "mlp"]
# the same layers for PEFT: the language model's seven projections and the tower blocks' linears
TRL_LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|.*visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)"
)


# ---------------------------------------------------------------------------------------------- setup
def _family():
    from sftop.engine.models.vision.registry import all_families

    return all_families()[FAMILY]


def build_model_dir(path: Path, shape: str) -> Path:
    """A random-init model of the shape with the family's offline processor (no hub access)."""
    import torch
    from transformers import AutoConfig

    if (path / "config.json").is_file():
        return path
    family = _family()
    spec = SHAPES[shape]
    # the tiny shape's vocabulary is the offline tokenizer's (a real one would only slow a CPU smoke run)
    text = {**spec.text, "vocab_size": 512} if "tiny" in shape else dict(spec.text)
    config = AutoConfig.for_model(
        spec.model_type, text_config=text, vision_config=dict(spec.vision), **spec.extra, **family.token_id_config()
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = family.model_class().from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    del model
    _processor_for_disk().save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def _processor_for_disk():
    """The offline processor, with a video processor where torchvision is installed: a saved Qwen-VL
    processor is then loaded by AutoProcessor as a hub checkpoint's is."""
    import importlib.util

    processor = _family().offline_processor()
    if importlib.util.find_spec("torchvision") is None:
        return processor
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=processor.chat_template,
    )


def make_rows(folder: Path, shape: str, n: int, seed: int) -> Path:
    """JSONL rows (messages + relative image paths) and their PNGs under `folder`."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    user_median, answer_median = TEXT_MEDIANS[shape]
    digits = lambda k: " ".join("".join(rng.choice("0123456789") for _ in range(5)) for _ in range(max(1, k // 6)))  # noqa: E731

    def length(median: int) -> int:
        return max(1, int(rng.lognormvariate(math.log(median), 0.6)))

    lines = []
    for i in range(n):
        names = []
        for k in range(rng.randint(1, 4)):
            width, height = rng.choice(IMAGE_SIZES[shape])
            name = f"img/{i}-{k}.png"
            if not (folder / name).is_file():
                colour = tuple(rng.randrange(256) for _ in range(3))
                Image.new("RGB", (width, height), colour).save(folder / name)
            names.append(name)
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": digits(length(user_median))}]
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": content},
                        {"role": "assistant", "content": [{"type": "text", "text": digits(length(answer_median))}]},
                    ],
                    "images": names,
                }
            )
        )
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sftop_preset(model_dir: Path, data: Path, seed: int, effective_batch: int, nf4: bool):
    from sftop.engine.presets.schema import Preset

    return Preset.model_validate(
        {
            "name": "vlm-whole-run",
            "description": "benchmarks/vlm_whole_run.py",
            "model": {"name": str(model_dir), "load_in_4bit": nf4},
            "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "parts": LORA_PARTS},
            # above the longest generated row (4 images of 352 tokens and long turns stay under 3,000):
            # no row is dropped, and padded plans are not sized for rows far longer than the data's
            "data": {"source": str(data), "max_length": 4096, "packing": True, "loss_on": "assistant"},
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


def data_stats(preset, model_dir: Path) -> dict:
    """Rows and exact tokens (image tokens included) as sftop's data check counts them."""
    from sftop.engine.train.vision_data import prepare_vision_data

    family = _family()
    prepared = prepare_vision_data(preset, family.load_processor(str(model_dir)), family)
    stats = prepared.stats
    return {
        "rows": stats.train_rows,
        "tokens": stats.tokens,
        "trained_tokens": stats.trained_tokens,
        "median": stats.length_p50,
        "p90": stats.length_p90,
        "max": stats.length_max,
        "images": sum(prepared.images_per_row),
        "image_tokens": sum(prepared.image_tokens_per_row),
    }


# ---------------------------------------------------------------------------------------------- trl
class _CountingCollator:
    """TRL's VLM collator, counting the non-padding tokens of every batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def trl_worker(model_dir: Path, data: Path, out: Path, seed: int, effective_batch: int, nf4: bool) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    on_cuda = torch.cuda.is_available()
    family = _family()
    processor = family.load_processor(str(model_dir))
    records = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        images = [Image.open(data.parent / name).convert("RGB") for name in row["images"]]
        records.append({"messages": row["messages"], "images": images})
    dataset = Dataset.from_list(records)
    kwargs = {}
    if nf4:
        from transformers import AutoConfig, BitsAndBytesConfig

        from sftop.engine.models.vision.loading import quantization_skip_modules

        model_config = AutoConfig.from_pretrained(model_dir)

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=quantization_skip_modules(family, model_config),
        )  # as sftop: the tower, the projector and the head stay 16-bit
    model = family.model_class().from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if on_cuda else torch.float32,
        attn_implementation="sdpa",
        **({"device_map": {"": 0}} if on_cuda else {}),
        **kwargs,
    )
    batch = 2 if effective_batch % 2 == 0 else 1
    args = SFTConfig(
        output_dir=str(out.parent / "trl-output"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=effective_batch // batch,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=2e-4,
        num_train_epochs=1,
        bf16=on_cuda,
        max_length=None,  # the guides: truncation would cut through image tokens
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=not on_cuda,
        **({} if on_cuda else {"loss_type": "nll"}),  # TRL's default chunked loss needs a GPU
    )
    collator = _CountingCollator(DataCollatorForVisionLanguageModeling(processor=processor, max_length=None))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TRL_LORA_TARGETS),
    )
    out.write_text(json.dumps({**bench_common.timed_train(trainer), "collated_tokens": collator.tokens}))


def run_trl(args, model_dir: Path, data: Path, out: Path, env: dict, tokens: int) -> dict:
    result_path = out / "trl-result.json"
    result_path.unlink(missing_ok=True)
    t1 = time.time()
    command = [
        sys.executable,
        __file__,
        "--out",
        str(out),
        "--seed",
        str(args.seed),
        "--effective-batch",
        str(args.effective_batch),
        "--trl-worker",
        str(model_dir),
        str(data),
        str(result_path),
    ] + (["--nf4"] if args.nf4 else [])
    done = subprocess.run(command, env=env)
    trl: dict[str, Any] = (
        json.loads(result_path.read_text()) if result_path.is_file() else {"failed": f"exit {done.returncode}"}
    )
    trl["wall_s"] = time.time() - t1
    trl["useful_tokens"] = tokens
    if "train_s" in trl:
        trl["useful_tokens_per_s"] = tokens / trl["train_s"]
    return trl


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shape", default="qwen2.5-vl-3b", choices=MODEL_SHAPES)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--effective-batch", type=int, default=8, help="rows per optimizer step, every path")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--nf4", action="store_true", help="every path on 4-bit NF4 base weights (QLoRA)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["trl", "sftop", "no-packing"])
    ap.add_argument("--trl-worker", nargs=3, metavar=("MODEL_DIR", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(
            Path(args.trl_worker[0]),
            Path(args.trl_worker[1]),
            Path(args.trl_worker[2]),
            args.seed,
            args.effective_batch,
            args.nf4,
        )
        return 0

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir = build_model_dir(out / f"model-{args.shape}", args.shape)
    print(f"model ready in {time.time() - t0:.1f}s: {model_dir}", flush=True)
    data = make_rows(out / "data", args.shape, args.rows, args.seed)
    preset = sftop_preset(model_dir, data, args.seed, args.effective_batch, args.nf4)
    stats = data_stats(preset, model_dir)
    print("data:", stats, flush=True)
    if stats["rows"] != args.rows:  # TRL would train rows sftop's check dropped: not the same data
        print(
            f"data check kept {stats['rows']} of {args.rows} rows: the paths would not train the same rows",
            file=sys.stderr,
        )
        return 2
    report: dict = {"shape": args.shape, "effective_batch": args.effective_batch, "nf4": args.nf4, "data": stats}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    if "trl" not in args.skip:
        report["trl"] = run_trl(args, model_dir, data, out, env, stats["tokens"])
        print("trl:", report["trl"], flush=True)
    runs = [
        (name, sets)
        for name, sets in (("sftop", []), ("sftop:no-packing", ["data.packing=false"]))
        if name.split(":")[-1] not in args.skip
    ]
    if runs:
        from sftop.engine.presets.loader import save_preset

        preset_path = save_preset(preset, out / "vlm-whole-run.toml")
    for name, sets in runs:
        result = run_sftop(preset_path, out / name.replace(":", "-"), sets, env, out, stats["tokens"])
        result["packing"] = (result.get("plan") or {}).get("packing")
        report[name] = result
        print(
            f"{name}:",
            {k: v for k, v in result.items() if k not in ("plan", "data", "kernels", "step_tokens_per_s")},
            flush=True,
        )
    report["sftop_rows"] = [name for name, _ in runs]
    for name in ("trl", *report["sftop_rows"]):
        r = report.get(name)
        if r and r.get("steps"):
            r["rows_per_step"] = round(stats["rows"] / r["steps"], 2)
    rate = {name: (report.get(name) or {}).get("useful_tokens_per_s") for name in ("trl", "sftop", "sftop:no-packing")}
    if rate["trl"] and rate["sftop"]:
        report["speedup_vs_trl"] = rate["sftop"] / rate["trl"]
    if rate["sftop"] and rate["sftop:no-packing"]:
        report["packing_gain"] = rate["sftop"] / rate["sftop:no-packing"]
    (out / "vlm_whole_run.json").write_text(json.dumps(report, indent=1, default=str))
    write_markdown(out, report)
    failed = [
        name
        for name in ("trl", *report["sftop_rows"])
        if name in report and not report[name].get("useful_tokens_per_s")
    ]
    return 1 if failed else 0


def write_markdown(out: Path, report: dict) -> None:
    d = report["data"]
    lines = [
        f"{d['rows']} image-text rows, {d['images']} images ({d['image_tokens']} image tokens), {d['tokens']} tokens "
        f"(median {d['median']}, p90 {d['p90']}, max {d['max']}), {report['shape']} shape"
        f"{' on NF4 weights' if report['nf4'] else ''}, LoRA r=16 on language and vision attention/MLP, "
        f"{report['effective_batch']} rows per optimizer step.",
        "",
        "| path | useful tokens/s | train time s | wall s | peak allocated GiB | steps | rows/step | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("trl", *report.get("sftop_rows", [])):
        r = report.get(name)
        if not r:
            continue
        rate = r.get("useful_tokens_per_s")
        plan = r.get("plan") or {}
        if plan:
            plan_text = (
                f"micro-batch {plan.get('micro_batch')} x {plan.get('grad_accum')}, "
                f"{'packed' if plan.get('packing') else 'padded'}, checkpointing {plan.get('gradient_checkpointing')}"
            )
        else:
            batch = 2 if report["effective_batch"] % 2 == 0 else 1
            plan_text = (
                f"batch {batch} x {report['effective_batch'] // batch}, padded, checkpointing" if name == "trl" else ""
            )
        peak = r.get("peak_allocated_gib")
        if rate:
            lines.append(
                f"| {name} | {rate:,.0f} | {r['train_s']:.1f} | {r['wall_s']:.1f} | "
                f"{'' if peak is None else f'{peak:.2f}'} | {r.get('steps', '')} | {r.get('rows_per_step', '')} "
                f"| {plan_text} |"
            )
        else:
            lines.append(f"| {name} | failed | | {r.get('wall_s', 0):.1f} | | | | {r.get('failed', '')} |")
        expected = math.ceil(d["rows"] / report["effective_batch"])
        if r.get("steps") and r["steps"] != expected:
            lines.append(
                f"| | | | | | | | WARNING: {r['steps']} steps, expected {expected}: not the same effective batch |"
            )
    if "speedup_vs_trl" in report:
        lines += ["", f"sftop / TRL useful tokens/s: {report['speedup_vs_trl']:.2f}x (target: at least 4x)."]
    if "packing_gain" in report:
        lines += [f"Packing alone (sftop packed / sftop padded): {report['packing_gain']:.2f}x."]
    (out / "vlm_whole_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
