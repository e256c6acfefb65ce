"""DPO step throughput and peak memory: TRL's DPOTrainer + PEFT (stock) vs sftop's DPO path.

Both paths run TRL 1.16's DPOTrainer loop on the same random-init model of a real shape, the same
pre-tokenised pairs (random ids; PAIRS pairs per micro-batch, SEQ tokens per side, the last
ANSWER of them the scored answer), LoRA r=16 on all seven projections, gradient checkpointing,
AdamW at lr 2e-4, reference = the model with its adapter disabled:

- stock: the base model + `peft_config` handed to `trl.DPOTrainer` (TRL's chunked log-prob head).
- sftop: `sftop.kernels.patch_model` on the LoRA model and `SftopDPOTrainer` with the fused linear
  log-prob head (`sftop.kernels.fused_linear_logprob`) on the policy and reference forwards.
- sftop-eager (when `--paths` names it): the sftop path with its CUDA graphs off
  (`SFTOP_CUDA_GRAPHS=0`), to compare the graphed step's speed and memory with the eager one's.
- sftop-shared (when `--paths` names it): the sftop path with `dpo.share_prompt` on, each pair's
  prompt run once (sftop/kernels/shared_prompt.py); tokens/s still counts both sides' whole rows,
  as for every path, so the ratio is the same pairs trained faster.
- unsloth (when `--paths` names it): Unsloth's recipe, `PatchDPOTrainer()`, then
  `FastLanguageModel.from_pretrained` and `get_peft_model(use_gradient_checkpointing="unsloth")`, in
  TRL's `DPOTrainer`.  Unsloth is imported in its own process, first, as it asks; where it cannot be
  imported (not installed, or a TRL release it does not accept) the path says so and is skipped.
  Unsloth accepts older TRL releases than sftop: `--peer-pythonpath DIRS` puts the folders holding
  Unsloth and the TRL it accepts in front of that process's PYTHONPATH only.

4-bit (`--4bit`): NF4 with double quantisation and bf16 compute, as a QLoRA user loads it.
bitsandbytes quantises while loading, so the random-init model is saved once (bf16 safetensors, in
/dev/shm where it exists: an 8B checkpoint is 16 GB) and every path loads it from there; Unsloth's
path loads that checkpoint in bf16 runs too.  Each result carries `load_s`, the seconds its
process spent building the model, apart from the timed steps.

Peak memory: `peak_gib` is the largest peak allocated memory of the steps that captured no CUDA
graph, with the graphs' pool counted whole (see PeakMeter); `capture_step_peak_bound_gib` bounds
the steps that captured from above; `peak_reserved_gib` is what the allocator reserved at most in
any step (pools, fragmentation and cache included), the same measure for every path.

Each path runs in its own subprocess of this script so that memory peaks and patches never leak
from one into the other; one command measures both and prints the ratio.

  python benchmarks/dpo_step.py --model llama-3.2-1b --pairs 2 --seq 1024 --json dpo_1b.json
  python benchmarks/dpo_step.py --model llama-3.1-8b --steps 4 --warmup 2 --json dpo_8b.json
  python benchmarks/dpo_step.py --model llama-3.1-8b --4bit --steps 4 --warmup 2 --json dpo_8b_nf4.json
  python benchmarks/dpo_step.py --model llama-3.2-1b --paths stock,sftop,unsloth --peer-pythonpath PEER_DIRS
  TRITON_INTERPRET=1 python benchmarks/dpo_step.py --model tiny --device cpu --steps 2 --warmup 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common
import step_bench  # model shapes and the random 4-bit checkpoint
import unsloth_peer  # Unsloth's process: imported first, offline, its own TRL


PROFILED_STEPS = 2  # after the timed steps, so that the profiler's overhead stays out of the timing


def _dataset(args, vocab: int):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    n = args.pairs * (args.steps + args.warmup)
    prompt = args.seq - args.answer

    def ids(k):
        return torch.randint(3, vocab, (n, k), generator=g).tolist()

    return Dataset.from_dict(
        {"prompt_ids": ids(prompt), "chosen_ids": ids(args.answer), "rejected_ids": ids(args.answer)}
    )


def _unsloth_model(args):
    """Unsloth's QLoRA/LoRA recipe on the saved random-init checkpoint (its loader reads a directory)."""
    model, _ = unsloth_peer.language_model(args.model_dir, args.seq, args.four_bit, step_bench.LORA_TARGETS)
    return model, None, None


def _model(args, path: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    if path == "unsloth":
        return _unsloth_model(args)
    if args.four_bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir,
            quantization_config=quant,
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            device_map={"": 0},
        )
    else:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(
                step_bench._config(args.model), dtype=dtype, attn_implementation="sdpa"
            )
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules=step_bench.LORA_TARGETS, task_type="CAUSAL_LM"
    )
    if path == "stock":
        return model, lora, None
    from sftop.kernels import patch_model

    model = get_peft_model(model, lora)
    return model, None, patch_model(model).to_dict()


def _unsloth_unavailable() -> str | None:
    """Why Unsloth's DPO cannot run in this process, or None once it is imported and patched.
    Must run before transformers and TRL are imported: Unsloth patches them on import."""
    why = unsloth_peer.unavailable("PatchDPOTrainer")
    if why is None:
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    return why


def _one(args, path: str) -> dict:
    if path == "unsloth":
        why = _unsloth_unavailable()
        if why is not None:
            return dict(path=path, unavailable=why)
    t_load = time.perf_counter()
    if path == "sftop-eager":  # read when the model is patched
        os.environ["SFTOP_CUDA_GRAPHS"] = "0"
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Pretokenised(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # the same ids for both paths
            return dataset

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens = [], 0

            self.prof = None

        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            if args.profile and len(self.times) == args.warmup + args.steps:  # the timed steps are done
                from torch.profiler import ProfilerActivity, profile

                # Python stacks only for a trace: they cost host time the summary's figures would carry
                self.prof = profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=bool(args.trace)
                )
                self.prof.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            if self.prof is not None and len(self.times) == args.warmup + args.steps + PROFILED_STEPS:
                self.prof.__exit__(None, None, None)

    class PeakMeter(TrainerCallback):
        """Each step's peak device memory.  A replayed CUDA graph allocates nothing, so its transients
        (in the graphs' pool) never reach the allocator's peak: a step that captured nothing adds the
        pool's idle bytes at its end to its allocated peak, i.e. it counts the whole pool once.  A
        step that captured adds the idle bytes the pool had when it began: an upper bound, as blocks
        its capture took from them count twice.  (Adding the pool to the peak of the whole run
        would count the transients twice: once from the eager steps before the captures, once in
        the pool.)  The reserved peak of each step, pools and cache included, is kept beside it."""

        def __init__(self):
            self.steady, self.capturing, self.reserved = [], [], []
            self.captures, self.idle = 0, 0

        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *a, model=None, **k):
            if args.device != "cuda":
                return
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.reserved.append(torch.cuda.max_memory_reserved())
            stats = _graph_stats(model) if path.startswith("sftop") else None
            captured = stats is not None and stats.captures != self.captures
            self.captures = 0 if stats is None else stats.captures
            idle_before = self.idle
            if stats is not None and stats.captures:
                from sftop.kernels.cuda_graphs import idle_pool_bytes

                self.idle = idle_pool_bytes()
            if captured:
                self.capturing.append(peak + idle_before)
            else:
                self.steady.append(peak + self.idle)

    if path == "sftop" and args.graph_chunk_mib:
        from sftop.kernels import logprob_graphs

        logprob_graphs.CHUNK_BYTES = args.graph_chunk_mib << 20
    model, peft_config, report = _model(args, path)
    tmp = tempfile.mkdtemp(prefix="dpo-bench-")
    cfg = DPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=args.steps + args.warmup + (PROFILED_STEPS if args.profile else 0),
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=args.device == "cuda",
        use_cpu=args.device != "cuda",
        gradient_checkpointing=True,
        # as `sftop run` passes its plan's checkpointing: "offload" moves the saved layer inputs to
        # pinned host memory (sftop's overlapped copies); the stock path always keeps them on the GPU
        gradient_checkpointing_kwargs={"use_reentrant": False, **_offload_kwargs(args, path)},
        max_length=None,
        beta=0.1,
        loss_type=["sigmoid"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer, meter = Timer(), PeakMeter()
    vocab = step_bench.SHAPES[args.model]["vocab_size"]
    tokenizer = unsloth_peer.word_tokenizer(vocab)
    common = dict(args=cfg, train_dataset=_dataset(args, vocab), processing_class=tokenizer, callbacks=[timer, meter])
    if path == "stock":
        trainer = Pretokenised(model=model, peft_config=peft_config, **common)
    elif path == "unsloth":
        trainer = Pretokenised(model=model, ref_model=None, **common)
    else:
        from sftop.engine.train.dpo import SftopDPOTrainer
        from sftop.engine.train.trainer import UpdateGuard

        trainer = SftopDPOTrainer(
            model=model,
            guard=UpdateGuard(5),
            save_total_limit=1,
            kernel_head=True,
            share_prompt=path == "sftop-shared",
            **common,
        )
    load_s = time.perf_counter() - t_load
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = timer.times[args.warmup : args.warmup + args.steps]
    step_s = sum(measured) / len(measured)
    tokens = 2 * args.pairs * args.seq  # chosen + rejected sides per step (the reference pass not counted)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    head = getattr(trainer, "sftop_head", "unsloth" if path == "unsloth" else "trl chunked")
    out = dict(
        path=path,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        pairs_per_s=args.pairs / step_s,
        losses=losses,
        kernels=report,
        head=head,
        load_s=round(load_s, 1),
    )
    if path.startswith("sftop"):
        import dataclasses

        stats = _graph_stats(trainer.model)
        out["graphs"] = trainer.sftop_graphs if stats is None else dataclasses.asdict(stats)
        out["shared_prompt"] = trainer.sftop_shared_prompt
    if args.device == "cuda":
        # the peak step (PeakMeter: graph pools included), and the allocator's whole footprint
        # (reserved: every pool, fragmentation and cache), the same measure for every path
        out["peak_gib"] = max(meter.steady) / 1024**3
        out["steady_step_peaks_gib"] = [round(b / 1024**3, 3) for b in meter.steady]
        if meter.capturing:
            out["capture_step_peak_bound_gib"] = max(meter.capturing) / 1024**3
        out["peak_reserved_gib"] = max(meter.reserved) / 1024**3
        out["step_reserved_gib"] = [round(b / 1024**3, 3) for b in meter.reserved]
        if isinstance(out.get("graphs"), dict) and out["graphs"]["replays"]:
            from sftop.kernels.cuda_graphs import idle_pool_bytes

            out["graph_pool_idle_gib"] = idle_pool_bytes() / 1024**3
    if timer.prof is not None:
        # GPU busy time against the wall time of the same steps: what is left is host time
        # (Python, TRL's bookkeeping, syncs) during which the GPU waits
        from sftop.engine.train import profiling

        out.update(step_bench.summarise_profile(timer.prof, PROFILED_STEPS))
        wall = sum(timer.times[-PROFILED_STEPS:]) / PROFILED_STEPS
        out["profile_wall_ms_per_step"] = round(wall * 1e3, 2)
        # the GPU's busy time as the union over streams (copies beside kernels count once), and the
        # host operations that cost the most, as step_bench.py --profile reports them
        events = profiling.device_events(timer.prof.profiler.kineto_results.events())
        busy = profiling.busy_ns([(a, b) for _n, on_device, a, b, _t in events if on_device]) / 1e6 / PROFILED_STEPS
        out["profile_gpu_busy_ms_per_step"] = round(busy, 2)
        out["profile_gpu_idle_share"] = round(max(0.0, 1 - busy / (wall * 1e3)), 3)
        out["profile_top_host_ops"] = profiling.top_host_ops(timer.prof, PROFILED_STEPS)
        if args.trace:
            Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
            timer.prof.export_chrome_trace(args.trace)
    return out


def trace_for_path(trace: str, path: str) -> str:
    """Each path's own trace file beside the one asked for: `dpo.json.gz` -> `dpo.sftop.json.gz`."""
    where = Path(trace)
    name = where.name
    stem, dot, ext = name.partition(".")
    return str(where.with_name(f"{stem}.{path}{dot}{ext}" if dot else f"{stem}.{path}"))


def _default_graph_chunk_mib() -> int:
    from sftop.kernels.constants import GRAPH_LOGPROB_CHUNK_BYTES

    return GRAPH_LOGPROB_CHUNK_BYTES >> 20


def _offload_kwargs(args, path: str) -> dict:
    return {"offload": True} if path.startswith("sftop") and args.checkpointing == "offload" else {}


def _graph_stats(model):
    """The DPO log-prob graphs' counters of an sftop model, or None (another path, or no graphed call yet)."""
    if model is None or not hasattr(model, "get_base_model"):
        return None
    try:
        from sftop.kernels.logprob_graphs import graph_stats
    except ImportError:  # a peer's process without sftop on its path
        return None
    return graph_stats(model.get_base_model())


def _checkpoint(args):
    """The random-init model saved once for loaders that read a directory (bitsandbytes' 4-bit
    quantisation, Unsloth), in memory-backed /dev/shm where it exists, with the benchmark's tokenizer."""
    return step_bench.random_checkpoint(args.model, args.device, in_memory=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(step_bench.SHAPES), default="llama-3.2-1b")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per side (prompt + answer)")
    ap.add_argument("--answer", type=int, default=256, help="answer tokens per side (scored)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile two more steps: GPU time by kernel kind, and the share of the step the GPU waits",
    )
    ap.add_argument(
        "--trace",
        help="with --profile: write the profiled steps' Chrome trace (with Python stacks) here; "
        "benchmarks/trace_gaps.py names what the host ran while the GPU waited",
    )
    ap.add_argument(
        "--paths",
        default="stock,sftop",
        help="comma-separated: stock, sftop, sftop-eager (sftop with its CUDA graphs off), sftop-shared "
        "(sftop with each pair's prompt run once), unsloth",
    )
    ap.add_argument(
        "--checkpointing",
        choices=["on", "offload"],
        default="on",
        help="sftop paths' gradient checkpointing: on (layer inputs kept on the GPU), or offload (kept in "
        "pinned host memory, as a plan with checkpointing 'offload' runs; Unsloth's path always offloads "
        "with its own, the stock path never does)",
    )
    ap.add_argument(
        "--graph-chunk-mib",
        type=int,
        help="one chunk's logits in the sftop path's graphed log-prob head (default: "
        "sftop.kernels.constants.GRAPH_LOGPROB_CHUNK_BYTES), to compare the graphs' memory and speed",
    )
    ap.add_argument("--peer-pythonpath", default="", help=unsloth_peer.HELP)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (TRITON_INTERPRET=1)")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.answer >= args.seq:
        ap.error("--answer must be smaller than --seq")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    known = ("stock", "sftop", "sftop-eager", "sftop-shared", "unsloth")
    unknown = sorted(set(paths) - set(known))
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}: choose among {', '.join(known)}")

    if args.one:
        print("RESULT " + json.dumps(_one(args, args.one)), flush=True)
        return 0

    tmp = None
    if (args.four_bit or "unsloth" in paths) and not args.model_dir:
        tmp = _checkpoint(args)
        args.model_dir = tmp.name

    def command(path: str) -> list[str]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            path,
            "--model",
            args.model,
            "--pairs",
            str(args.pairs),
            "--seq",
            str(args.seq),
            "--answer",
            str(args.answer),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        if args.profile:
            cmd += ["--profile"]
            if args.trace:
                cmd += ["--trace", trace_for_path(args.trace, path)]
        cmd += ["--checkpointing", args.checkpointing]
        if args.graph_chunk_mib:
            cmd += ["--graph-chunk-mib", str(args.graph_chunk_mib)]
        if args.four_bit:
            cmd += ["--4bit"]
        if args.model_dir:
            cmd += ["--model-dir", args.model_dir]
        if path == "unsloth":
            cmd = unsloth_peer.command(cmd, args.peer_pythonpath)
        return cmd

    results = step_bench.run_paths(paths, command)
    out = dict(
        model=args.model,
        pairs=args.pairs,
        seq=args.seq,
        answer=args.answer,
        steps=args.steps,
        warmup=args.warmup,
        four_bit=args.four_bit,
        sftop_checkpointing=args.checkpointing,
        graph_chunk_mib=args.graph_chunk_mib or _default_graph_chunk_mib(),
        **bench_common.result_header(args.device, "transformers", "trl"),
        results=results,
    )
    print(
        f"DPO {args.model} {'nf4' if args.four_bit else 'bf16' if args.device == 'cuda' else 'fp32'} {args.pairs} pairs x {args.seq} tokens per side "
        f"on {out['device']}; sftop's checkpointing {args.checkpointing}"
    )
    for r in results:
        unmeasured = bench_common.unmeasured_line(r, 6)
        if unmeasured is not None:
            print(unmeasured)
        else:
            peak = (
                f"peak {r['peak_gib']:6.2f} GiB (reserved {r['peak_reserved_gib']:5.2f})  " if "peak_gib" in r else ""
            )
            print(
                f"  {r['path']:6s} {r['tokens_per_s']:10,.0f} tok/s  {peak}"
                f"x{r.get('speed_vs_stock', float('nan')):.2f} vs stock  loss {r['losses'][-1]:.4f}  head {r['head']}"
            )
            if "graphs" in r:
                g = r["graphs"]
                print(
                    f"         CUDA graphs: {g}"
                    if isinstance(g, str)
                    else f"         CUDA graphs: {g['captures']} captured, {g['replays']} replays, "
                    f"{g['eager_calls']} eager calls"
                    + (f", failures: {g['failures']}" if g["failures"] else "")
                    + (
                        f"; capture steps at most {r['capture_step_peak_bound_gib']:.2f} GiB"
                        if "capture_step_peak_bound_gib" in r
                        else ""
                    )
                )
            if r.get("path") == "sftop-shared":
                print(f"         each prompt once: {r.get('shared_prompt')}")
            if "profile_share" in r:
                print(
                    f"         GPU busy {r['profile_gpu_busy_ms_per_step']:.1f} ms of a {r['profile_wall_ms_per_step']:.1f} "
                    f"ms step (idle {r['profile_gpu_idle_share']:.0%}); kernel time by kind: "
                    + ", ".join(f"{k} {v:.0%}" for k, v in list(r["profile_share"].items())[:6])
                )
                print(
                    "         host ops (own ms, calls a step): "
                    + ", ".join(f"{name} {ms} ({n})" for name, ms, n in r["profile_top_host_ops"][:8])
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
