"""How close is the planner's peak-memory estimate to `torch.cuda.max_memory_allocated`? (GPU only)

Matrix: Llama-3.2-1B, Qwen2.5-1.5B and Llama-3.1-8B shapes x bf16/NF4 x gradient checkpointing
off/on x sequence 512/2048/8192 x loss path, with PEFT LoRA r=16 on all linear layers, batch 1,
random token ids (labels = inputs), two AdamW steps (Adam states appear at the first step).
Models are random-init from configs (no downloads): built on the meta device, materialised on the
GPU and filled in place; NF4 swaps each decoder projection for a bitsandbytes Linear4bit.

Loss paths: "trl" = TRL's chunked log-prob head (SFTTrainer's default, `fused_lm_head=True`);
"sftop" = sftop.kernels.patch_model (fused RMSNorm/SwiGLU/RoPE + fused linear-CE); "hf" = plain
`model(labels=...)` with full fp32 logits. Combos the estimate says cannot fit the GPU are skipped
with a note. Writes planner_accuracy.json and planner_accuracy.md to --out.

    python benchmarks/planner_accuracy.py --out /tmp/acc            # about 5-8 minutes on an H100
    python benchmarks/planner_accuracy.py --out /tmp/acc --shapes llama-1b --seqs 512 2048

Whole runs under memory caps instead (benchmarks/planner_caps.py): one `sftop run` per cap on
benchmarks/whole_run.py's mixed-length data, with the plan chosen, predicted and measured peak and
useful tokens/s per cap, written to planner_caps.json and planner_caps.md:

    python benchmarks/planner_accuracy.py --caps 4,8,12,24 --out /tmp/caps --shapes llama-1b --rows 300
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch import nn

from sftop.engine.planner.estimate import GIB, LossImpl, ModelShape, Setup, estimate

SHAPES = {
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "qwen-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    # Only for a CPU smoke test of this script (--device cpu): not part of the matrix.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
    "llama-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
LOSS_TO_SETUP: dict[str, tuple[LossImpl, bool]] = {
    "hf": ("full", False),
    "trl": ("chunked", False),
    "sftop": ("fused", True),
}


def make_config(name: str):
    from transformers import AutoConfig

    spec = dict(SHAPES[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_model(config, nf4: bool, loss: str, device: str = "cuda"):
    """Random-init bf16 model on the GPU (NF4 projections if asked), LoRA r=16 all-linear."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    # Non-persistent buffers (RoPE inv_freq) are garbage after to_empty: rebuild that module.
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=config)
    model.tie_weights()
    if nf4:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in list(layer.modules()):
                for child_name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        q = bnb.nn.Linear4bit(
                            child.in_features,
                            child.out_features,
                            bias=child.bias is not None,
                            compute_dtype=torch.bfloat16,
                            compress_statistics=True,
                            quant_type="nf4",
                            device="meta",
                        )
                        q.weight = bnb.nn.Params4bit(
                            child.weight.data,
                            requires_grad=False,
                            compress_statistics=True,
                            quant_type="nf4",
                            module=q,
                        ).to(device)
                        if child.bias is not None:
                            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                        setattr(parent, child_name, q)
        gc.collect()
        torch.cuda.empty_cache()
    model.config.use_cache = False
    if loss == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # before PEFT, as TRL's SFTTrainer does
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    if loss == "sftop":
        from sftop.kernels import patch_model

        report = patch_model(model)
        print("  sftop kernels:", report.to_dict(), flush=True)
    model.train()
    return model


def set_checkpointing(model, mode: str, every: int = 1) -> None:
    base = model.get_base_model()
    base.gradient_checkpointing_disable()
    if mode != "off":
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}, offload=mode == "offload", every_n_layers=every
        )


def loss_of(model, ids, loss: str, position_ids=None):
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if loss == "trl":
        out = model(input_ids=ids, labels=ids, fused_lm_head=True, **extra)
        return -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
    out = model(input_ids=ids, labels=ids, **extra)
    return out.loss


def measure(
    model,
    seq: int,
    loss: str,
    steps: int,
    vocab: int,
    device: str = "cuda",
    packed: bool = False,
    doc_len: int | None = None,
) -> dict:
    cuda = device != "cpu"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    ids = torch.randint(0, vocab, (1, seq), device=device)
    # Packed: four documents in one padding-free row, positions restarting at each (as TRL's collator
    # does); transformers then builds a block-diagonal mask for SDPA.
    doc_len = doc_len or max(1, seq // 4)
    position_ids = torch.arange(seq, device=device).remainder(doc_len).unsqueeze(0) if packed else None
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = loss_of(model, ids, loss, position_ids)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del value
    result = {
        "measured_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else float("nan"),
        "baseline_gib": baseline / GIB,
        "step_s": min(times),
    }
    del opt, ids
    for p in params:
        p.grad = None
    return result


def check_plan(model, config, shape, shape_name: str, weights: str, loss: str, total_gib: float, args) -> dict:
    """Does the planner's own choice for an empty GPU of this size run without OOM, and fit?

    Preset: max_length 2048, packing, effective batch 16, SDPA. The worst micro-batch is one
    padding-free row of micro_batch documents of 2048 tokens.
    """
    from sftop.engine.planner import plan_run
    from sftop.engine.planner.estimate import CUDA_CONTEXT_BYTES
    from sftop.engine.presets.schema import Preset

    preset = Preset.model_validate(
        {
            "name": "acc",
            "model": {"name": shape_name, "load_in_4bit": weights == "nf4", "attn_implementation": "sdpa"},
            "lora": {"r": 16, "alpha": 16},
            "data": {"max_length": 2048, "packing": True},
            "train": {"effective_batch": 16, "kernels": "on" if loss == "sftop" else "off"},
        }
    )
    row: dict[str, Any] = {"shape": shape_name, "weights": weights, "loss": loss, "plan_check": True, "packed": True}
    try:
        plan = plan_run(preset, config, gpu_memory_gib=total_gib)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result too
        row["status"] = f"refused: {exc}"[:300]
        return row
    row.update(
        checkpointing=plan.gradient_checkpointing,
        seq=plan.tokens_per_micro_batch,
        predicted_gib=plan.predicted_allocated_gib,
        predicted_device_gib=plan.predicted_peak_gib,
        budget_gib=plan.budget_gib,
        plan=plan.to_dict(),
    )
    try:
        set_checkpointing(model, plan.gradient_checkpointing, plan.checkpoint_every_n_layers)
        row.update(
            measure(
                model,
                plan.tokens_per_micro_batch,
                loss,
                args.steps,
                shape.vocab,
                args.device,
                packed=True,
                doc_len=2048,
            )
        )
        device_peak = row["reserved_gib"] + CUDA_CONTEXT_BYTES / GIB
        row["error_pct"] = round(100 * (row["predicted_gib"] / row["measured_gib"] - 1), 2)
        row["fits_budget"] = device_peak <= plan.budget_gib
        row["status"] = "ok" if row["fits_budget"] else f"over budget: {device_peak:.2f} GiB on the device"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OUT OF MEMORY with the planner's choice"
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny"], choices=list(SHAPES))
    ap.add_argument("--device", default="cuda", help="cpu only smoke-tests this script (no memory numbers)")
    ap.add_argument("--weights", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[512, 2048, 8192])
    ap.add_argument(
        "--losses",
        nargs="+",
        default=None,
        choices=list(LOSS_TO_SETUP),
        help="default: trl, plus sftop when its kernels are available",
    )
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--packed-seqs",
        nargs="*",
        type=int,
        default=[2048, 8192],
        help="extra packed (4 documents per row) cases, bf16 only, on the first shape",
    )
    ap.add_argument("--time-budget", type=float, default=450.0, help="seconds; later combos are skipped")
    ap.add_argument(
        "--no-plan-check",
        dest="plan_check",
        action="store_false",
        help="skip running the planner's own choice (micro-batch x 2048 packed) per model",
    )
    ap.add_argument(
        "--caps",
        default=None,
        metavar="GIB,GIB,...",
        help="whole runs under these plan.max_memory_gib caps ('none': no cap) instead of the matrix; "
        "takes the first of --shapes (llama-1b or tiny), --rows, --effective-batch, --seed",
    )
    ap.add_argument("--rows", type=int, default=300, help="--caps: chat rows of whole_run.py's data")
    ap.add_argument("--effective-batch", type=int, default=8, help="--caps: rows per optimizer step")
    ap.add_argument("--seed", type=int, default=42, help="--caps: data and training seed")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=V",
        help="--caps: a preset override for every capped run (as `sftop run --set`)",
    )
    args = ap.parse_args()
    if args.caps:
        from planner_caps import parse_caps, run_caps

        result = run_caps(
            args.out, parse_caps(args.caps), args.shapes[0], args.rows, args.effective_batch, args.seed, args.sets
        )
        return 0 if result["exit_code"] == 0 else 1
    cuda = args.device != "cpu"
    if cuda and not torch.cuda.is_available():
        print("planner_accuracy needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    losses = args.losses
    if losses is None:
        losses = ["trl"]
        try:
            from sftop.kernels import kernels_available

            if kernels_available():
                losses.append("sftop")
        except Exception as exc:  # noqa: BLE001 - the kernels are optional here
            print("sftop kernels unavailable:", exc)
    total_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 1e9
    start = time.time()
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for shape_name in args.shapes:
        config = make_config(shape_name)
        shape = ModelShape.from_config(config)
        for weights in args.weights:
            for loss in losses:
                loss_impl, kernels = LOSS_TO_SETUP[loss]
                combos = [(gc_mode, seq, False) for gc_mode in args.checkpointing for seq in args.seqs]
                if weights == "bf16" and shape_name == args.shapes[0]:
                    combos += [(gc_mode, seq, True) for gc_mode in args.checkpointing for seq in args.packed_seqs]
                model = None
                for gc_mode, seq, packed in combos:
                    setup = Setup(
                        load_in_4bit=weights == "nf4",
                        checkpointing=gc_mode,
                        kernels=kernels,
                        loss=loss_impl,
                        packed=packed,
                    )
                    est = estimate(shape, setup, seq, seq_len=seq)
                    row = {
                        "shape": shape_name,
                        "weights": weights,
                        "checkpointing": gc_mode,
                        "seq": seq,
                        "loss": loss,
                        "packed": packed,
                        "predicted_gib": round(est.allocated_gib, 3),
                        "predicted_device_gib": round(est.device_gib, 3),
                        "peak_phase": est.peak_phase,
                        "terms_gib": est.breakdown_gib(),
                    }
                    rows.append(row)
                    if est.device_gib > 0.97 * total_gib:
                        row["status"] = f"skipped: predicted {est.device_gib:.1f} GiB cannot fit {total_gib:.0f} GiB"
                        continue
                    if time.time() - start > args.time_budget:
                        row["status"] = "skipped: time budget spent"
                        continue
                    try:
                        if model is None:
                            t0 = time.time()
                            model = build_model(config, weights == "nf4", loss, args.device)
                            print(f"built {shape_name} {weights} {loss} in {time.time() - t0:.1f}s", flush=True)
                        set_checkpointing(model, gc_mode)
                        row.update(measure(model, seq, loss, args.steps, shape.vocab, args.device, packed))
                        row["error_pct"] = round(100 * (row["predicted_gib"] / row["measured_gib"] - 1), 2)
                        row["status"] = "ok"
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "out of memory"
                    except Exception as exc:  # noqa: BLE001 - one bad combo must not lose the matrix
                        row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                    print(json.dumps({k: v for k, v in row.items() if k != "terms_gib"}), flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                if args.plan_check and model is not None and time.time() - start < args.time_budget + 60:
                    rows.append(check_plan(model, config, shape, shape_name, weights, loss, total_gib, args))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("terms_gib", "plan")}), flush=True)
                del model
                gc.collect()
                torch.cuda.empty_cache()
    write(args.out, rows, total_gib, time.time() - start, args.device)
    return 0


def write(out: Path, rows: list[dict], total_gib: float, wall_s: float, device: str) -> None:
    import peft
    import transformers

    meta = {
        "gpu": torch.cuda.get_device_name(0) if device != "cpu" else "cpu (smoke test)",
        "gpu_total_gib": round(total_gib, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "wall_s": round(wall_s, 1),
    }
    (out / "planner_accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    checks = [r for r in rows if r.get("plan_check")]
    rows = [r for r in rows if not r.get("plan_check")]
    ok = [r for r in rows if r.get("status") == "ok"]
    within = sum(abs(r["error_pct"]) <= 10 for r in ok)
    lines = [
        f"Measured on {meta['gpu']} ({meta['gpu_total_gib']} GiB), torch {meta['torch']}, transformers "
        f"{meta['transformers']}, peft {meta['peft']}; LoRA r=16 all-linear, batch 1, AdamW, {wall_s:.0f} s in all.",
        f"Within +-10%: {within} of {len(ok)} measured combinations. Seq `Np` is one padding-free row of 4 packed "
        "documents (SDPA gets a block-diagonal mask); error = predicted / measured - 1.",
        "",
        "| shape | weights | loss | checkpointing | seq | predicted GiB | measured GiB | error | reserved GiB | step s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seq = f"{r['seq']}p" if r.get("packed") else str(r["seq"])
        if r.get("status") == "ok":
            lines.append(
                f"| {r['shape']} | {r['weights']} | {r['loss']} | {r['checkpointing']} | {seq} | "
                f"{r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {r['error_pct']:+.1f}% | "
                f"{r['reserved_gib']:.2f} | {r['step_s']:.3f} | |"
            )
        else:
            lines.append(
                f"| {r['shape']} | {r['weights']} | {r['loss']} | {r['checkpointing']} | {seq} | "
                f"{r['predicted_gib']:.2f} | | | | | {r.get('status', '')} |"
            )
    if checks:
        lines += [
            "",
            "The planner's own choice for an empty GPU of this size (max_length 2048, packing, effective batch 16), "
            "one padding-free row of micro_batch documents:",
            "",
            "| shape | weights | loss | plan | tokens | predicted GiB | measured GiB | error | device peak fits budget | status |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in checks:
            plan = r.get("plan") or {}
            every = plan.get("checkpoint_every_n_layers", 1) if plan else 1
            desc = (
                (
                    f"{plan.get('micro_batch')} x {plan.get('grad_accum')}, ckpt {plan.get('gradient_checkpointing')}"
                    + (f" 1 in {every}" if every > 1 else "")
                )
                if plan
                else ""
            )
            measured = f"{r['measured_gib']:.2f}" if "measured_gib" in r else ""
            err = f"{r['error_pct']:+.1f}%" if "error_pct" in r else ""
            lines.append(
                f"| {r['shape']} | {r['weights']} | {r['loss']} | {desc} | {r.get('seq', '')} | "
                f"{r.get('predicted_gib', float('nan')):.2f} | {measured} | {err} | {r.get('fits_budget', '')} | "
                f"{r.get('status', '')} |"
            )
    (out / "planner_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
