"""Training-step throughput and peak memory: stock HF + PEFT vs sftop's patched path.

Random-init models of real shapes, random token ids with labels = inputs, LoRA r=16 on all seven
linear layers, gradient checkpointing (non-reentrant), fused AdamW at lr 2e-4 -- the setup in
docs/peers.md.  Each path runs in its own subprocess so that memory peaks and patches never
leak from one into the other.

  python benchmarks/step_bench.py --model llama-3.2-1b --batch 4 --seq 2048 --steps 10 --json out.json
  python benchmarks/step_bench.py --model llama-3.2-1b --4bit --json out4.json
  python benchmarks/step_bench.py --model qwen2.5-vl-3b --batch 4 --seq 1024 --profile --vision-parts
  python benchmarks/step_bench.py --model qwen2.5-vl-3b --paths stock,sftop-language,sftop --vision-parts

Vision-language shapes (`benchmarks/vlm_shapes.py`: qwen2.5-vl-3b, gemma-3-4b) put one image at the
start of every row; LoRA then covers the language model's projections and the vision tower's linear
layers, and 4-bit quantises the language model only (the tower and projector stay bf16).

`--paths ...,unsloth` adds Unsloth's recipe, in its own process with Unsloth imported first
(benchmarks/unsloth_peer.py): FastLanguageModel for the text shapes, FastVisionModel for the vision
shapes (LoRA r=16 on the tower's and the language model's attention and MLP), its offloaded
checkpointing, loaded from the same random checkpoint saved once to a local directory, and the
same plain loop on the same random batches. Where Unsloth cannot be imported the path says why and
the others run. Unsloth accepts older TRL releases than sftop: `--peer-pythonpath DIRS` puts the
folders holding Unsloth and that TRL first on its process's path only. Under `--4bit` Unsloth
chooses what to quantise; every path prints which linear layers it kept in 16-bit.

  python benchmarks/step_bench.py --model llama-3.2-1b --paths sftop,unsloth --checkpointing offload --peer-pythonpath DIRS
  python benchmarks/step_bench.py --model qwen2.5-vl-3b --batch 4 --seq 1024 --paths stock,sftop,unsloth --peer-pythonpath DIRS
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common
import unsloth_peer
import vlm_shapes

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        head_dim=64,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        head_dim=128,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}
# for a CPU smoke run of the script itself (TRITON_INTERPRET=1 --device cpu), not for numbers
SHAPES["tiny"] = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
    head_dim=16,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(name: str):
    from transformers import AutoConfig

    if vlm_shapes.is_vision_shape(name):
        return vlm_shapes.config(name)
    shape = dict(SHAPES[name])
    model_type = shape.pop("model_type")
    cfg = AutoConfig.for_model(model_type, max_position_embeddings=8192, **shape)
    cfg.use_cache = False
    return cfg


def random_checkpoint(name: str, device: str, in_memory: bool = False) -> tempfile.TemporaryDirectory:
    """A bf16 random-init model of shape `name` saved to a temporary directory with a tokenizer (or a
    vision model's processor) built offline: bitsandbytes quantises at load time and Unsloth's loaders
    read a directory, so those paths load from there (keep the object alive meanwhile). `in_memory`:
    in /dev/shm where it exists and has room."""
    import torch

    cfg = _config(name)
    size = None
    if in_memory:
        with torch.device("meta"):
            size = 2 * _model_class(name).from_config(cfg).num_parameters()
    tmp = tempfile.TemporaryDirectory(dir=unsloth_peer.checkpoint_dir(size) if size else None)
    torch.manual_seed(0)
    # random init on the GPU: an 8B model's init on the host alone took minutes
    with torch.device(device):
        model = _model_class(name).from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp.name)
    unsloth_peer.save_processing(tmp.name, cfg)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the measured paths run in other processes: leave them the GPU
    return tmp


def _model_class(name: str):
    from transformers import AutoModelForCausalLM

    return vlm_shapes.model_class() if vlm_shapes.is_vision_shape(name) else AutoModelForCausalLM


def _vision_skip_modules(cfg) -> list[str]:
    """The modules 4-bit loading leaves 16-bit in a VLM: sftop's own list (tower, projector, head)."""
    from sftop.engine.models.vision.loading import quantization_skip_modules
    from sftop.engine.models.vision.registry import family_for_config

    family = family_for_config(cfg)
    if family is None:
        raise SystemExit(f"step_bench: no sftop vision family for model_type {cfg.model_type!r}")
    return quantization_skip_modules(family, cfg)


def _lora_targets(name: str, frozen_tower: bool = False):
    if not vlm_shapes.is_vision_shape(name):
        return LORA_TARGETS
    return vlm_shapes.LANGUAGE_LORA if frozen_tower else vlm_shapes.SHAPES[name].lora_targets


def _checkpointing(args, path: str) -> dict:
    """Non-reentrant checkpointing; sftop's path may offload the layer inputs to pinned host memory
    (--checkpointing offload: sftop's overlapped copies; offload-hf: transformers' save_on_cpu, for
    comparison), the stock path always keeps them on the GPU."""
    return dict(
        gradient_checkpointing_kwargs={"use_reentrant": False},
        offload=path != "stock" and args.checkpointing in ("offload", "offload-hf"),
    )


def _enable_checkpointing(model, args, path: str) -> None:
    if path != "stock" and args.checkpointing == "offload-hf":
        base = model.get_base_model()
        type(base).gradient_checkpointing_enable(base, **_checkpointing(args, path))  # past sftop's patch
    else:
        model.gradient_checkpointing_enable(**_checkpointing(args, path))


def _build_unsloth(args):
    """Unsloth's recipe on the saved checkpoint (its loaders read a directory): FastVisionModel for
    the vision shapes, FastLanguageModel for the text ones; LoRA r=16 on the same layers as the other
    paths (vision shapes: attention and MLP of the tower and the language model), its offloaded
    checkpointing, then `for_training` as its trainers do before the first step."""
    import torch

    torch.manual_seed(0)
    if vlm_shapes.is_vision_shape(args.model):
        from unsloth import FastVisionModel as fast

        model, _ = unsloth_peer.vision_model(args.model_dir, args.seq, args.four_bit, vision=not args.frozen_tower)
        layers = "language" if args.frozen_tower else "vision + language"
        recipe = f"FastVisionModel, get_peft_model({layers}, attention + MLP), checkpointing 'unsloth'"
    else:
        from unsloth import FastLanguageModel as fast

        model, _ = unsloth_peer.language_model(args.model_dir, args.seq, args.four_bit, LORA_TARGETS)
        recipe = "FastLanguageModel, get_peft_model(7 projections), checkpointing 'unsloth'"
    model = fast.for_training(model) or model  # it switches the model in place and returns it
    return model, dict(recipe=recipe, versions=unsloth_peer.versions())


def weights_by_precision(model) -> dict[str, dict[str, int]]:
    """The model's linear layers (LoRA adapters aside) counted by where they sit and how their
    weights are stored: {"4-bit": {"model.language_model.layers": 252}, "16-bit": {"lm_head": 1}}.
    Shows what a 4-bit load quantised and what it kept in 16-bit (towers, projectors, heads)."""
    import re

    import torch

    out: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name:
            continue
        name = re.sub(r"^(base_model\.model\.)+", "", name).removesuffix(".base_layer")
        parts = name.split(".")
        cut = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1 if len(parts) > 1 else 1)
        region = ".".join(parts[:cut])
        kind = (
            "4-bit"
            if type(module).__name__ == "Linear4bit" or hasattr(module.weight, "quant_state")
            else str(module.weight.dtype).removeprefix("torch.")
        )
        kind = "16-bit" if kind in ("bfloat16", "float16") else kind
        out.setdefault(kind, {})
        out[kind][region] = out[kind].get(region, 0) + 1
    return out


def _graphed_vlm(model: str, path: str) -> bool:
    """A vision shape whose step replays the tower's and language layers' graphs on this path (the
    environment switches as the path set them); `sftop-default-loss-chunk` keeps the default chunk."""
    from sftop.kernels.constants import CUDA_GRAPHS_ENV, VISION_GRAPHS_ENV
    from sftop.kernels.env import env_flag

    return (
        vlm_shapes.is_vision_shape(model)
        and path != "sftop-default-loss-chunk"
        and env_flag(CUDA_GRAPHS_ENV, default=True)
        and env_flag(VISION_GRAPHS_ENV, default=True)
    )


def _build(args, path: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if path == "unsloth":
        return _build_unsloth(args)
    torch.manual_seed(0)
    cfg = _config(args.model)
    model_class = _model_class(args.model)
    if args.four_bit:
        # a VLM's tower, projector and head stay bf16, named exactly as `sftop run` names them:
        # transformers 5 matches these names from the start of a module's full name
        skip = _vision_skip_modules(cfg) if vlm_shapes.is_vision_shape(args.model) else None
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
        # bitsandbytes quantises at load time, so the random model goes through a local directory
        model = model_class.from_pretrained(
            args.model_dir,
            quantization_config=quant,
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            device_map={"": 0},
        )
        if path == "stock":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            # sftop's loader (sftop.engine.models.loading) does not call prepare_model_for_kbit_training:
            # its fp32 upcast of the embeddings, norms and lm_head (1 GiB for a 128K vocab) and of the
            # residual stream is what the quantisation was meant to save.  The fused kernels compute
            # norms and the loss in fp32 internally, which is what the upcast is there for.
            pass
    else:
        with torch.device(args.device):
            model = model_class.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        if path == "stock":
            model.gradient_checkpointing_enable(**_checkpointing(args, path))
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=_lora_targets(args.model, args.frozen_tower),
            task_type="CAUSAL_LM",
        ),
    )
    report = None
    if path != "stock":
        from sftop.kernels import patch_model

        if path == "sftop-eager":  # the same patched model without CUDA graphs, for the ratio
            os.environ["SFTOP_CUDA_GRAPHS"] = "0"
        if path == "sftop-tower-graphs":  # a VLM's tower and language graphs asked for by name (the default)
            os.environ["SFTOP_VISION_GRAPHS"] = "1"
        if path == "sftop-no-vision-graphs":  # a VLM's step without them, for the ratio
            os.environ["SFTOP_VISION_GRAPHS"] = "0"
        if path == "sftop-pool-each":  # a VLM's tower and language graphs each in a pool of its own
            os.environ["SFTOP_SHARED_GRAPH_POOL"] = "0"
        if path == "sftop-chunked-mlp":  # checkpointed LoRA MLPs rebuild gate and up in backward
            os.environ["SFTOP_CHUNKED_MLP"] = "1"
        if path == "sftop-small-loss-chunk" or _graphed_vlm(args.model, path):
            # the fused loss in the planner's small logits chunks; a VLM with its graphs always takes
            # them, as `sftop run`'s plan does (docs/planner.md)
            from sftop.kernels.constants import SMALL_FUSED_CE_CHUNK_BYTES
            from sftop.kernels.fused_linear_cross_entropy import set_chunk_bytes

            set_chunk_bytes(SMALL_FUSED_CE_CHUNK_BYTES)
        if vlm_shapes.is_vision_shape(args.model):
            # as `sftop run` does for a VLM: the kernels on the language layers its family names
            from sftop.engine.models.vision.loading import apply_vision_kernels
            from sftop.engine.models.vision.registry import family_for_config

            family = family_for_config(model.config)
            assert family is not None, f"{args.model}: a vision shape whose model_type no vision family claims"
            report = apply_vision_kernels(model, family, "auto")
            from sftop.engine.models.vision import frozen_tower

            report["frozen_tower"] = frozen_tower.install(model)  # as `sftop run`'s loader does
            if path == "sftop-language":  # the tower's own parts off: what they add, in the same call
                from sftop.kernels.patching.towers import patch_towers

                report["vision_parts"] = patch_towers(model, enable=False)
            if path == "sftop-stock-merge":  # transformers' masked_scatter merge of the image features
                from sftop.kernels.patching.image_merge import unpatch_image_merge

                unpatch_image_merge(model)
                report["vision_parts"]["image_merge"] = "stock: taken off for the comparison"
        else:
            report = patch_model(model).to_dict()
        # as in `sftop run`, where Trainer enables checkpointing on the patched model
        if args.checkpointing != "off":
            _enable_checkpointing(model, args, path)
    return model, report


def _category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "cublas", "matmul", "nvjet", "splitk")):
        return "matmul"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "efficient_attention")):
        return "attention"
    if any(k in n for k in ("_rms_", "_rope_", "_glu_", "_ce_rows")):
        return "sftop triton"
    if "triton" in n:
        return "other triton"
    if any(k in n for k in ("dequant", "kdequantize", "quant")):
        return "4-bit dequant"
    if any(k in n for k in ("adam", "foreach", "multi_tensor")):
        return "optimizer"
    if any(
        k in n
        for k in (
            "elementwise",
            "vectorized",
            "reduce",
            "copy",
            "cast",
            "fill",
            "index",
            "cat",
            "where",
            "softmax",
            "nll",
            "log_softmax",
        )
    ):
        return "elementwise/reduce/copy"
    return "other"


def _one(args, path: str) -> dict:
    vision = vlm_shapes.is_vision_shape(args.model)
    if path == "unsloth":  # first, before transformers and PEFT are imported: Unsloth patches them
        why = unsloth_peer.unavailable("FastVisionModel" if vision else "FastLanguageModel")
        if why is not None:
            return dict(path=path, unavailable=why)
    import torch

    model, report = _build(args, path)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = args.device == "cuda"
    opt = torch.optim.AdamW(params, lr=2e-4, fused=cuda)
    model.train()
    gen = torch.Generator(device=args.device).manual_seed(1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    vocab = model.config.get_text_config().vocab_size
    step, make_batch = training_step(model, opt, args, gen)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [step().item() for _ in range(args.warmup)]
    sync()
    warm_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    losses.append(loss.item())
    result = dict(
        path=path,
        tokens_per_s=args.batch * args.seq * args.steps / dt,
        step_s=dt / args.steps,
        peak_gib=max(warm_peak, torch.cuda.max_memory_allocated()) / 2**30 if cuda else float("nan"),
        losses=losses,
        patch=report,
    )
    if args.four_bit:
        result["weights"] = weights_by_precision(model)
    graphs = _graph_stats(model) if cuda else None
    if graphs is not None:
        result["cuda_graphs"] = graphs
        if graphs["replays"]:
            # replays allocate nothing, so the allocator's peak misses the step's transients, which
            # live in the graphs' pool: count all of the pool's idle memory on top (an upper bound)
            from sftop.kernels.cuda_graphs import idle_pool_bytes

            pool = idle_pool_bytes()
            steady = torch.cuda.max_memory_allocated() + pool
            result.update(
                peak_gib=max(warm_peak, steady) / 2**30,
                graph_pool_idle_gib=pool / 2**30,
                steady_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            )
    if cuda:
        result["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if vision and args.vision_parts and path != "unsloth":  # its compiled modules are not split that way
        result["vision_parts_s"] = _vision_parts(model, make_batch, opt, args, sync)
    if args.memory_phases and cuda and not vision and path != "unsloth" and not (graphs and graphs["replays"]):
        result["memory_phases_gib"] = _memory_phases(
            model, ids_shape=(args.batch, args.seq), vocab=vocab, gen=gen, opt=opt
        )
    if args.profile:
        try:
            result.update(_profile(step))
        except Exception as exc:  # noqa: BLE001 - the timing above must survive a profiler problem
            result["profile_error"] = f"{type(exc).__name__}: {exc}"
    return result


def training_step(model, opt, args, gen):
    """(step, make_batch): `step()` trains one step on a fresh random batch of args.batch rows of
    args.seq tokens (a vision shape's rows with their image, else token ids as their own labels) and
    returns its loss; `make_batch` makes a vision shape's batches (None for a text shape)."""
    import torch

    vocab = model.config.get_text_config().vocab_size
    make_batch = (
        vlm_shapes.batch_maker(args.model, model.config, args.batch, args.seq, args.device, gen)
        if vlm_shapes.is_vision_shape(args.model)
        else None
    )

    def step():
        if make_batch is not None:
            loss = model(**make_batch()).loss
        else:
            ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, make_batch


def _vision_parts(model, make_batch, opt, args, sync) -> dict:
    """Seconds per step of each part on its own, forward and backward: the vision tower with its
    projector (its output summed into a scalar), and the language model on the same rows with
    text in place of the image tokens. What the whole step takes beyond their sum is the joining
    (scattering image features into the embeddings, 3-D position ids) and per-part overheads."""

    def timed(fn, n):
        for _ in range(2):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    features = vlm_shapes.vision_part(model)

    def vision_step():
        features(make_batch()).float().sum().backward()
        opt.zero_grad(set_to_none=True)

    def text_step():
        model(**vlm_shapes.text_only(make_batch())).loss.backward()
        opt.zero_grad(set_to_none=True)

    n = max(2, args.steps // 2)
    return dict(vision_tower_and_projector=timed(vision_step, n), language_model_text_only=timed(text_step, n))


def _graph_stats(model) -> dict | None:
    """The captured steps' counters: the model's own graphs, plus a vision-language model's tower and
    language layers' (parts vision_graphs, language_graphs)."""
    from sftop.kernels.patching.markers import GRAPHS, LANGUAGE_GRAPHS, TOWER_GRAPHS

    base = model.get_base_model()
    found = [base.__dict__.get(GRAPHS)]
    found += [m.__dict__.get(name) for m in base.modules() for name in (TOWER_GRAPHS, LANGUAGE_GRAPHS)]
    found = [g for g in found if g is not None]
    if not found:
        return None
    stats = [g.stats for g in found]
    return dict(
        eager_calls=sum(st.eager_calls for st in stats),
        captures=sum(st.captures for st in stats),
        replays=sum(st.replays for st in stats),
        failures=[f for st in stats for f in st.failures],
    )


def _memory_phases(model, ids_shape, vocab, gen, opt) -> dict:
    """Peak allocated memory in each part of one step: the decoder layers' forward, the loss
    (final norm onward), backward and the optimizer step, plus what forward leaves for backward."""
    import torch

    gib = 2**30
    marks = {}
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)

    def layers_done(_module, _inputs, _output):
        if "layers_forward" in marks:  # the checkpoint recomputation in backward calls it again
            return
        marks["layers_forward"] = torch.cuda.max_memory_allocated() / gib
        torch.cuda.reset_peak_memory_stats()

    hook = backbone.layers[-1].register_forward_hook(layers_done)
    try:
        ids = torch.randint(0, vocab, ids_shape, device="cuda", generator=gen)
        torch.cuda.synchronize()
        marks["before_step"] = torch.cuda.memory_allocated() / gib
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        marks["loss"] = torch.cuda.max_memory_allocated() / gib
        marks["kept_for_backward"] = torch.cuda.memory_allocated() / gib
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        marks["backward"] = torch.cuda.max_memory_allocated() / gib
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        marks["optimizer"] = torch.cuda.max_memory_allocated() / gib
    finally:
        hook.remove()
    return {k: round(v, 3) for k, v in marks.items()}


def _profile(step) -> dict:
    """Two profiled steps: GPU time by kernel kind (summarise_profile), and where the wall time goes
    (the GPU's busy time, union over streams, against the wall time of the same steps; the host
    operations that cost the most), since a step whose GPU idles is bound by its host work."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sftop.engine.train import profiling

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / PROFILED_STEPS
    result = summarise_profile(prof, PROFILED_STEPS)
    events = profiling.device_events(prof.profiler.kineto_results.events())
    busy_ms = profiling.busy_ns([(a, b) for _n, on_device, a, b, _t in events if on_device]) / 1e6 / PROFILED_STEPS
    result["profile_wall_ms_per_step"] = round(wall_ms, 2)
    result["profile_gpu_busy_ms_per_step"] = round(busy_ms, 2)
    result["profile_top_host_ops"] = profiling.top_host_ops(prof, PROFILED_STEPS)  # name, own ms, calls per step
    return result


PROFILED_STEPS = 2


def summarise_profile(prof, steps: int) -> dict:
    """GPU kernel time of `steps` profiled steps: share by kernel kind, ms per step, the top kernels."""
    result: dict[str, Any] = {}
    cats: dict[str, float] = {}
    top = []
    for evt in prof.key_averages():
        t: float = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        # kernels only: CPU-side ops would count their kernels' time a second time
        cpu_side = str(getattr(evt, "device_type", "CUDA")).endswith("CPU")
        if t <= 0 or evt.key.startswith("ProfilerStep") or cpu_side:
            continue
        cats[_category(evt.key)] = cats.get(_category(evt.key), 0.0) + t
        top.append((t, evt.count // steps, evt.key[:90]))
    total = sum(cats.values()) or 1.0
    result["profile_share"] = {k: round(v / total, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    result["profile_gpu_ms_per_step"] = total / 1e3 / steps
    result["profile_top"] = [
        (round(t / 1e3 / steps, 2), n, k) for t, n, k in sorted(top, reverse=True)[:40]
    ]  # ms, calls per step
    return result


def run_paths(paths: list[str], command) -> list[dict]:
    """Each path in its own subprocess (`command(path)`, which prints one `RESULT {json}` line), so
    memory peaks and patches never leak from one into the other; `speed_vs_stock` where stock ran."""
    results: list[dict[str, Any]] = []
    for path in paths:
        proc = subprocess.run(command(path), capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr or proc.stdout)[-3000:]
            print(f"[{path}] failed (rc {proc.returncode}):\n{err}", file=sys.stderr)
            results.append(dict(path=path, error=err[-800:]))
            continue
        results.append(json.loads(line[len("RESULT ") :]))
    stock = next((r for r in results if r.get("path") == "stock" and "tokens_per_s" in r), None)
    for r in results:
        if stock and "tokens_per_s" in r:
            r["speed_vs_stock"] = r["tokens_per_s"] / stock["tokens_per_s"]
    return results


PATHS = (
    "stock",
    "sftop",
    "sftop-eager",
    "sftop-language",
    "sftop-tower-graphs",
    "sftop-no-vision-graphs",
    "sftop-pool-each",
    "sftop-chunked-mlp",
    "sftop-small-loss-chunk",
    "sftop-default-loss-chunk",
    "sftop-stock-merge",
    "unsloth",
)


def compare_with_unsloth(results: list[dict]) -> None:
    """Every measured path's speed and peak against Unsloth's, where Unsloth ran in the same command."""
    peer = next((r for r in results if r.get("path") == "unsloth" and "tokens_per_s" in r), None)
    if peer is None:
        return
    for r in results:
        if "tokens_per_s" in r:
            r["speed_vs_unsloth"] = r["tokens_per_s"] / peer["tokens_per_s"]
            if r.get("peak_gib") == r.get("peak_gib") and peer.get("peak_gib") == peer.get("peak_gib"):  # not NaN
                r["peak_minus_unsloth_gib"] = r["peak_gib"] - peer["peak_gib"]


def weights_text(weights: dict[str, dict[str, int]]) -> str:
    """`weights_by_precision` in one line: '4-bit: model.language_model.layers (252); 16-bit: lm_head (1)'."""
    return "; ".join(
        f"{kind}: " + ", ".join(f"{region} ({n})" for region, n in sorted(regions.items()))
        for kind, regions in sorted(weights.items())
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted([*SHAPES, *vlm_shapes.SHAPES]), default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    ap.add_argument(
        "--frozen-tower",
        action="store_true",
        help="vision shapes: LoRA on the language model only, the tower frozen (sftop's default LoRA parts); "
        "every path, Unsloth's with finetune_vision_layers=False",
    )
    ap.add_argument(
        "--paths",
        default="stock,sftop",
        help="comma-separated: stock, sftop (patched, CUDA graphs on), sftop-eager (patched, graphs off), "
        "sftop-language (vision shapes: the language layers patched, the vision tower stock), "
        "sftop-tower-graphs (vision shapes: sftop with the tower's blocks and the language layers replayed "
        "from CUDA graphs, named: SFTOP_VISION_GRAPHS=1, the default), "
        "sftop-no-vision-graphs (vision shapes: sftop with those graphs off: SFTOP_VISION_GRAPHS=0), "
        "sftop-pool-each (vision shapes: those graphs in a memory pool each, SFTOP_SHARED_GRAPH_POOL=0, "
        "instead of the one they share), "
        "sftop-chunked-mlp (checkpointed LoRA MLPs save neither gate nor up and rebuild them in token "
        "chunks in backward: SFTOP_CHUNKED_MLP=1), "
        "sftop-small-loss-chunk (sftop with the fused loss's logits in 64 MiB chunks, the planner's small "
        "chunk, instead of 256 MiB; a vision shape's sftop path takes them already while its graphs are on, "
        "as `sftop run` does), sftop-default-loss-chunk (vision shapes: sftop with 256 MiB chunks), "
        "sftop-stock-merge (vision shapes: sftop with transformers' masked_scatter merge of the image "
        "features instead of part image_merge), "
        "unsloth (Unsloth's recipe in its own process; see --peer-pythonpath)",
    )
    ap.add_argument("--peer-pythonpath", default="", help=unsloth_peer.HELP)
    ap.add_argument(
        "--checkpointing",
        choices=["on", "offload", "offload-hf", "off"],
        default="on",
        help="sftop path only; the stock path always keeps its layer inputs on the GPU. off: no "
        "checkpointing on any path (what the planner chooses where the GPU has room)",
    )
    ap.add_argument("--profile", action="store_true", help="torch.profiler share of GPU time by kernel category")
    ap.add_argument("--memory-phases", action="store_true", help="peak memory in forward, loss, backward, optimizer")
    ap.add_argument(
        "--vision-parts",
        action="store_true",
        help="vision shapes: time the vision tower and the language model on their own too",
    )
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}: choose among {', '.join(PATHS)}")

    if args.one:
        print("RESULT " + json.dumps(_one(args, args.one)), flush=True)
        return 0

    tmp = None
    if (args.four_bit or "unsloth" in paths) and not args.model_dir:
        tmp = random_checkpoint(args.model, args.device, in_memory=True)
        args.model_dir = tmp.name

    def command(path: str) -> list[str]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            path,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "--checkpointing",
            args.checkpointing,
        ]
        if args.four_bit:
            cmd += ["--4bit"]
        if args.model_dir:
            cmd += ["--model-dir", args.model_dir]
        if args.profile:
            cmd.append("--profile")
        if args.memory_phases:
            cmd.append("--memory-phases")
        if args.vision_parts:
            cmd.append("--vision-parts")
        if args.frozen_tower:
            cmd.append("--frozen-tower")
        return unsloth_peer.command(cmd, args.peer_pythonpath) if path == "unsloth" else cmd

    results = run_paths(paths, command)
    compare_with_unsloth(results)
    out = dict(
        model=args.model,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        sftop_checkpointing=args.checkpointing,
        four_bit=args.four_bit,
        frozen_tower=args.frozen_tower,
        **bench_common.result_header(args.device, "triton", "transformers"),
        results=results,
    )
    print(f"{args.model} {'nf4' if args.four_bit else 'bf16'} batch {args.batch} x {args.seq} on {out['device']}")
    for r in results:
        unmeasured = bench_common.unmeasured_line(r, 11)
        if unmeasured is not None:
            print(unmeasured)
        else:
            vs_peer = f"x{r['speed_vs_unsloth']:.2f} vs unsloth  " if "speed_vs_unsloth" in r else ""
            print(
                f"  {r['path']:11s} {r['tokens_per_s']:10,.0f} tok/s  peak {r['peak_gib']:6.2f} GiB  "
                f"x{r.get('speed_vs_stock', float('nan')):.2f} vs stock  {vs_peer}loss {r['losses'][-1]:.3f}"
            )
            if "weights" in r:
                print("         linear layers:", weights_text(r["weights"]))
            if r["path"] == "unsloth" and isinstance(r.get("patch"), dict):
                print("         recipe:", r["patch"]["recipe"], "|", r["patch"]["versions"])
            if "profile_share" in r:
                for row in r["profile_top"][:15]:
                    print("           ", row)
                print(
                    "         profile:",
                    r["profile_share"],
                    f"GPU {r['profile_gpu_ms_per_step']:.1f} ms of {1e3 * r['step_s']:.1f} ms per step",
                )
            if "profile_top_host_ops" in r:
                print(
                    f"         profiled steps: GPU busy {r['profile_gpu_busy_ms_per_step']:.1f} ms of "
                    f"{r['profile_wall_ms_per_step']:.1f} ms wall; host ops (own ms, calls per step):"
                )
                for row in r["profile_top_host_ops"][:15]:
                    print("           ", row)
            if isinstance(r.get("patch"), dict) and "vision_parts" in r["patch"]:
                print("         vision tower:", r["patch"]["vision_parts"])
            if "vision_parts_s" in r:
                print("         parts (s per step):", {k: round(v, 4) for k, v in r["vision_parts_s"].items()})
            if "memory_phases_gib" in r:
                print("         memory:", r["memory_phases_gib"])
            if "cuda_graphs" in r:
                print(
                    "         cuda graphs:",
                    r["cuda_graphs"],
                    "pool idle GiB",
                    round(r.get("graph_pool_idle_gib", 0.0), 3),
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
