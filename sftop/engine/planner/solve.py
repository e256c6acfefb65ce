"""Choose micro-batch, gradient accumulation and checkpointing so a run fits its GPU and runs fast.

Every candidate (checkpointing mode x micro-batch dividing the effective batch) is sized for its
worst micro-batch (micro_batch rows of max_length tokens) with `estimate`, kept if its device peak
fits the budget, and ranked by a relative step-time model; the fastest wins. More memory only adds
candidates, so a bigger GPU never gets a slower plan. docs/planner.md states the rules.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from sftop.engine.errors import PresetError, ResourceError
from sftop.engine.gpu import GIB, GpuStatus, read_gpus
from sftop.engine.planner.cap import MemoryCap, memory_cap
from sftop.engine.planner.estimate import (
    Checkpointing,
    Estimate,
    checkpointed_layers,
    kernels_cover,
    ModelShape,
    Setup,
    estimate,
    lora_modules,
)
from sftop.kernels.constants import FUSED_CE_CHUNK_BYTES
from sftop.kernels.constants import SMALL_FUSED_CE_CHUNK_BYTES as SMALL_LOSS_CHUNK

# Checkpoint only every n-th block (transformers' every_n_layers) as rungs between "off" and "on".
PARTIAL_EVERY = (4, 3, 2)


def rungs(layers: int, fixed: Checkpointing | None = None) -> list[tuple[Checkpointing, int]]:
    """(checkpointing, every_n_layers) from most memory / least recomputation to least memory.

    A fixed `plan.gradient_checkpointing` keeps its plain meaning ("on" = every block).
    """
    if fixed is not None:
        return [(fixed, 1)]
    partial: list[tuple[Checkpointing, int]] = []
    counts = {layers}
    for n in PARTIAL_EVERY:
        c = -(-layers // n)  # blocks checkpointed; two n's that checkpoint as many blocks are one rung
        if n < layers and c not in counts:
            counts.add(c)
            partial.append(("on", n))
    return [("off", 1), *partial, ("on", 1), ("offload", 1)]


def rung_label(mode: str, every: int) -> str:
    return mode if every == 1 else f"on (1 in {every} blocks)"


# Bigger than this and a CPU run would take hours per step: refuse instead of planning for the CPU.
CPU_MAX_PARAMS = 200_000_000
# GPU sizes people rent or own (GB as sold, GiB usable), smallest first, for the refusal's advice.
COMMON_GPUS = (
    (8, 7.6, "RTX 4060 / 3070"),
    (12, 11.6, "RTX 3060 / 4070"),
    (16, 15.6, "RTX 4080 / A4000 / T4"),
    (24, 23.6, "RTX 3090 / 4090 / A10 / L4"),
    (40, 39.4, "A100 40GB"),
    (48, 47.4, "L40S / A6000"),
    (80, 79.2, "A100 80GB / H100"),
    (141, 139.8, "H200"),
)
# Relative step-time model (see docs/planner.md): a nominal matmul rate, the tokens at which a
# micro-batch reaches half of it, and the fixed launch/Python cost of a micro-batch.
NOMINAL_FLOPS = 400e12
HALF_EFFICIENCY_TOKENS = 512
MICRO_BATCH_OVERHEAD_S = 0.004
PER_LAYER_OVERHEAD_S = 0.0004
DEQUANT_FLOP_EQUIV_PER_PARAM = 1200.0  # NF4 dequantisation is memory-bound: bytes moved in matmul-time
OFFLOAD_SLOWDOWN = 1.05
# Where sftop's CUDA graphs would engage but their pool does not fit the budget, each micro-batch
# runs eagerly and is bound by the host launching its kernels: seconds per decoder layer and pass
# (forward, backward, and the recomputation when checkpointed).  Measured: a Llama-3.2-1B packed
# run (2 micro-batches of <= 3,712 tokens, checkpointing on) took 0.266 s a step eagerly under a
# memory cap and about 0.085 s replaying its graphs without one (one H100, 2026-12-06,
# docs/benchmarks.md): (0.266 / 2) / (16 layers x 3 passes) ~ 2.7 ms.
EAGER_HOST_S_PER_LAYER_PASS = 0.0027


@dataclass(frozen=True)
class Constraints:
    micro_batch: int | None = None
    grad_accum: int | None = None
    checkpointing: Checkpointing | None = None


@dataclass
class PlanContext:
    """What a plan was solved from, so it can be stepped down or re-solved without the preset."""

    shape: ModelShape
    setup: Setup  # checkpointing here is ignored; each candidate sets its own
    model_name: str
    max_length: int
    packing: bool
    effective_batch: int
    row_tokens_mean: float
    budget_bytes: int
    device: str
    gpu_name: str | None
    constraints: Constraints
    gpu_uuid: str | None = None
    calibration: float = 1.0  # measured / predicted dynamic memory, from a probe
    cap: MemoryCap | None = None  # the user's plan.max_memory_*; budget_bytes is already within it
    uncapped_budget_bytes: int | None = None  # what the GPU alone would allow
    gpu_total_bytes: int | None = None
    # Packed runs sized from the data: packed_tokens[b - 1] is the most tokens a packed micro-batch
    # of b rows can hold (the b longest rows), instead of b x max_length. See `size_for_data`.
    packed_tokens: tuple[int, ...] | None = None
    # "tokens": packed_tokens come from sftop's own row order with each step's rows split into
    # micro-batches of about equal tokens (sftop.engine.planner.token_split); "rows": the b longest rows.
    split_by: str = "rows"
    notes: list[str] = field(default_factory=list)  # about the GPU and inputs; each plan adds its estimate's
    # Several processes (planner/multi.py): effective_batch above is one rank's share; per_gpu holds
    # (device, name, uuid, budget bytes) of every rank; shard_bytes what FSDP2 saves per rank.
    world_size: int = 1
    strategy: str = "single"
    strategy_reason: str | None = None
    per_gpu: tuple[tuple[str, str | None, str | None, int], ...] = ()
    shard_bytes: int = 0


@dataclass
class Plan:
    micro_batch: int
    grad_accum: int
    effective_batch: int
    tokens_per_micro_batch: int
    packing: bool
    max_length: int
    gradient_checkpointing: Checkpointing
    load_in_4bit: bool
    device: str
    gpu_name: str | None
    predicted_peak_gib: float
    predicted_allocated_gib: float
    budget_gib: float
    headroom_gib: float
    breakdown: dict[str, float]
    predicted_relative_step_time: float  # vs the fastest fitting candidate (1.0 = it)
    modelled_step_s: float  # the step-time model's seconds per optimizer step; only ratios are meaningful
    candidates: list[dict[str, Any]]
    reason: str
    notes: list[str] = field(default_factory=list)
    model_name: str = ""
    dtype: str = "bf16"
    kernels: bool = True
    loss: str = "fused"
    attention: str = "sdpa"  # as sized: "varlen" is sftop's packed attention (no mask)
    varlen_native_gqa: bool = True  # as sized: False when torch's varlen API takes K and V repeated
    lora_r: int = 16
    optimizer: str = "adamw"
    # With gradient_checkpointing "on": checkpoint every n-th decoder block only. Trainer: pass it
    # as gradient_checkpointing_kwargs["every_n_layers"] (transformers' Trainer pops it there).
    checkpoint_every_n_layers: int = 1
    # The chosen GPU's UUID: pin the trainer to it (CUDA_VISIBLE_DEVICES=<uuid>, then it is cuda:0).
    gpu_uuid: str | None = None
    # The user's memory cap in GiB (plan.max_memory_gib, or the fraction of this GPU), which the
    # budget already respects and the trainer holds its allocator to; memory_cap says which key set it.
    max_memory_gib: float | None = None
    memory_cap: str | None = None
    # Several processes: "ddp" (a full copy per GPU) or "fsdp2" (sharded); micro_batch and grad_accum
    # are per process, effective_batch = micro_batch x grad_accum x world_size. per_gpu: each rank's
    # device, name, predicted peak and budget.
    world_size: int = 1
    strategy: str = "single"
    strategy_reason: str | None = None
    per_gpu: list[dict[str, Any]] = field(default_factory=list)
    # "tokens": each optimizer step's effective_batch rows are split into grad_accum micro-batches of
    # about equal tokens (micro_batch rows on average), none above tokens_per_micro_batch
    split_by: str = "rows"
    # The fused loss's logits chunk in MiB where the plan needs a smaller one than the kernels'
    # default (so that CUDA graphs' pool fits); None: the default. The trainer sets it
    # (fused_linear_cross_entropy.set_chunk_bytes).
    loss_chunk_mib: int | None = None
    # Why this plan trains eagerly where sftop's CUDA graphs would engage: their pool does not fit
    # the budget (None: no such refusal).  The trainer then captures nothing for the run
    # (sftop.kernels.cuda_graphs.refuse_captures): its own room check, made at capture time, once
    # let a capture run out of memory under a cap the plan had sized eagerly (docs/benchmarks.md).
    graphs_refused: str | None = None
    context: PlanContext | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "context"}
        data["breakdown"] = dict(self.breakdown)
        data["candidates"] = [dict(c) for c in self.candidates]
        data["notes"] = list(self.notes)
        data["per_gpu"] = [dict(g) for g in self.per_gpu]
        return data

    def describe(self) -> str:
        if self.split_by == "tokens":
            return (
                f"{self.effective_batch} rows/step in {self.grad_accum} micro-batch"
                f"{'es' if self.grad_accum > 1 else ''} of <= {self.tokens_per_micro_batch:,} tokens, "
                f"checkpointing {rung_label(self.gradient_checkpointing, self.checkpoint_every_n_layers)}"
                + (", 4-bit" if self.load_in_4bit else "")
            )
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.grad_accum}, "
            f"checkpointing {rung_label(self.gradient_checkpointing, self.checkpoint_every_n_layers)}"
            + (", 4-bit" if self.load_in_4bit else "")
        )


@dataclass
class _Candidate:
    micro_batch: int
    grad_accum: int
    checkpointing: Checkpointing
    every: int
    estimate: Estimate
    device_bytes: int
    allocated_bytes: int
    time_s: float
    fits: bool
    graphs: bool = False  # sftop's CUDA graphs engage (their pool is in the estimate)
    loss_chunk_bytes: int = FUSED_CE_CHUNK_BYTES
    graphs_refused: str | None = None  # they would engage, but their pool does not fit: why

    def key(self) -> tuple:
        # Fastest first; on a tie, less recomputation, then the bigger micro-batch.
        return (round(self.time_s, 9), memory_rank(self.checkpointing, self.every), -self.micro_batch)

    @property
    def label(self) -> str:
        return rung_label(self.checkpointing, self.every)


def memory_rank(mode: str, every: int) -> int:
    """Order of rungs by recomputation: off, 1 in 4, 1 in 3, 1 in 2, every block, offload."""
    if mode == "off":
        return 0
    if mode == "offload":
        return 10
    return 5 if every == 1 else 5 - (every - 1)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def setup_from_preset(preset: Any, device: str) -> Setup:
    """Memory-relevant choices of a preset, for the device it will run on."""
    on_cpu = device == "cpu"
    dtype = preset.model.dtype
    if dtype == "auto":
        dtype = "fp32" if on_cpu else "bf16"
    kernels = preset.train.kernels != "off" and not on_cpu
    attention = preset.model.attn_implementation
    if attention == "auto":
        # What the model loader picks: flash-attention on a GPU when it is installed, else SDPA.
        import importlib.util

        has_flash = not on_cpu and dtype in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None
        attention = "flash_attention_2" if has_flash else "sdpa"
    return Setup(
        dtype=dtype,
        load_in_4bit=bool(preset.model.load_in_4bit),
        lora_r=preset.lora.r,
        # Names the model does not use (fused qkv_proj, ...) are sized as all-linear, an upper bound.
        lora_targets=lora_modules(preset.lora.targets) or lora_modules("all-linear"),
        lora_dropout=preset.lora.dropout,
        optimizer=preset.train.optimizer,
        kernels=kernels,
        # Without sftop's kernels TRL's own chunked log-prob head computes the loss.
        loss="fused" if kernels else "chunked",
        attention=attention,
        on_gpu=not on_cpu,
        packed=bool(preset.data.packing) and preset.train.task != "dpo",  # DPO pads its pairs
        preference=preset.train.task == "dpo",
        # DPO's graphs, or packed SFT's bucket graphs (estimate.graph_pool_bytes says where they engage)
        cuda_graphs=kernels and _cuda_graphs_allowed() and (preset.train.task == "dpo" or bool(preset.data.packing)),
        vision_graphs=kernels and not on_cpu and _cuda_graphs_allowed() and _vision_graphs_asked(),
    )


def _cuda_graphs_allowed() -> bool:
    from sftop.kernels.constants import CUDA_GRAPHS_ENV
    from sftop.kernels.env import env_flag

    return env_flag(CUDA_GRAPHS_ENV, default=True)


def _vision_graphs_asked() -> bool:
    from sftop.kernels.constants import VISION_GRAPHS_ENV
    from sftop.kernels.env import env_flag

    return env_flag(VISION_GRAPHS_ENV, default=True)


def _target_notes(preset: Any) -> list[str]:
    targets = preset.lora.targets
    if targets == "all-linear":
        return []
    unknown = [t for t in targets if t not in lora_modules(targets)]
    if not unknown:
        return []
    if not lora_modules(targets):
        return [
            f"LoRA targets {', '.join(unknown)} are not Llama-style projection names; memory is sized as for "
            "all-linear (an upper bound)"
        ]
    return [f"LoRA targets {', '.join(unknown)} are not sized (not Llama-style projection names)"]


def constraints_from_preset(preset: Any) -> Constraints:
    plan = preset.plan
    c = Constraints(
        micro_batch=None if plan.micro_batch == "auto" else int(plan.micro_batch),
        grad_accum=None if plan.grad_accum == "auto" else int(plan.grad_accum),
        # the schema allows only "auto" and the Checkpointing names
        checkpointing=None if plan.gradient_checkpointing == "auto" else plan.gradient_checkpointing,
    )
    e = preset.train.effective_batch
    if c.micro_batch and c.grad_accum and c.micro_batch * c.grad_accum != e:
        raise PresetError(
            f"plan.micro_batch ({c.micro_batch}) x plan.grad_accum ({c.grad_accum}) = {c.micro_batch * c.grad_accum}, "
            f"but train.effective_batch is {e}",
            where="plan.micro_batch / plan.grad_accum",
            hint='Make their product equal train.effective_batch, or set one of them to "auto"',
        )
    for key, value in (("micro_batch", c.micro_batch), ("grad_accum", c.grad_accum)):
        if value and e % value:
            fits = ", ".join(str(d) for d in divisors(e))
            raise PresetError(
                f"plan.{key} = {value} does not divide train.effective_batch = {e}, so the effective batch "
                "could not be kept exactly",
                where=f"plan.{key}",
                hint=f'Use one of {fits}, or "auto"',
            )
    return c


def step_time_s(
    shape: ModelShape,
    setup: Setup,
    checkpointing: str,
    micro_batch: int,
    grad_accum: int,
    row_tokens_mean: float,
    max_length: int,
    packing: bool,
    eager_host_bound: bool = False,
) -> float:
    # setup.checkpointing / checkpoint_every say how many blocks recompute
    """Modelled seconds per optimizer step; only ratios between candidates mean anything.

    `eager_host_bound`: sftop's CUDA graphs would engage but do not fit, so each micro-batch takes
    at least the host's time to launch it eagerly (EAGER_HOST_S_PER_LAYER_PASS)."""
    rows = micro_batch
    if packing:
        tokens = rows * row_tokens_mean
    else:
        # Padded batches grow to their longest row; the expected maximum grows about with log(rows).
        tokens = rows * min(max_length, row_tokens_mean * (1 + 0.35 * math.log(rows)))
    matmul_params = shape.linear_params + shape.vocab * shape.hidden
    # Forward plus input-gradient backward (frozen weights get no weight gradient).
    flops_tok: float = 4 * matmul_params
    ctx = row_tokens_mean / 2  # causal attention: average context per token
    if packing and setup.attention not in ("flash_attention_2", "varlen"):
        ctx = tokens  # SDPA with a block-diagonal mask computes every query against the whole packed row
    attn_fwd = 4 * ctx * shape.q_dim * shape.layers
    flops_tok += 3 * attn_fwd
    recompute = checkpointed_layers(shape, setup) / shape.layers
    flops_tok += recompute * (2 * shape.linear_params + attn_fwd)
    efficiency = tokens / (tokens + HALF_EFFICIENCY_TOKENS)
    t = flops_tok * tokens / (NOMINAL_FLOPS * efficiency)
    if setup.load_in_4bit:
        passes = 3 if checkpointing != "off" else 2
        t += passes * shape.linear_params * DEQUANT_FLOP_EQUIV_PER_PARAM / NOMINAL_FLOPS
    t += MICRO_BATCH_OVERHEAD_S + PER_LAYER_OVERHEAD_S * shape.layers * (1 + 0.5 * recompute)
    if checkpointing == "offload":
        t *= OFFLOAD_SLOWDOWN
    if eager_host_bound:
        t = max(t, EAGER_HOST_S_PER_LAYER_PASS * shape.layers * (2 + recompute))
    return t * grad_accum


def _sized(ctx: PlanContext, setup: Setup, tokens: int, sequences: int) -> tuple[Estimate, int, int]:
    """The estimate of one candidate's step, and its allocated and device bytes after the probe's
    correction and FSDP2's sharding."""
    est = estimate(ctx.shape, setup, tokens, seq_len=ctx.max_length, rows=sequences)
    allocated, device = est.allocated_bytes, est.device_bytes
    if ctx.calibration != 1.0:
        static = est.terms["weights"] + est.terms["lora_params"]
        extra = int((ctx.calibration - 1.0) * (allocated - static))
        allocated += extra
        device += int(extra * 1.1)
    device -= ctx.shard_bytes  # FSDP2: the other ranks hold the rest of the weights
    allocated -= ctx.shard_bytes
    return est, allocated, device


def _candidate(ctx: PlanContext, checkpointing: Checkpointing, micro_batch: int, every: int = 1) -> _Candidate:
    setup = replace(ctx.setup, checkpointing=checkpointing, checkpoint_every=every)
    sequences = micro_batch * (2 if setup.preference else 1)  # DPO: chosen and rejected of each pair
    tokens = sequences * ctx.max_length
    if ctx.packed_tokens and ctx.packing and not setup.preference:
        tokens = min(tokens, ctx.packed_tokens[min(micro_batch, len(ctx.packed_tokens)) - 1])
    # rows: a packed micro-batch's image load is its rows' images, however few tokens it holds
    est, allocated, device = _sized(ctx, setup, tokens, sequences)
    graphs = "graph_pool" in est.terms or "vision_graph_pool" in est.terms
    vlm = setup.images is not None
    eager = False
    refused: str | None = None
    if vlm and "vision_graph_pool" in est.terms and setup.loss_chunk_bytes > SMALL_LOSS_CHUNK:
        # A VLM's fused loss runs inside its language graphs (patching/language_graphs.py), where
        # its logits chunk takes blocks of the pool the layers' forward freed: a 256 MiB chunk needs
        # a block that large there.  Measured with the loss still eager beside both pools
        # (docs/benchmarks.md, 2026-12-07, Qwen2.5-VL-3B NF4): 64 MiB chunks took 0.19 GiB off the
        # peak at the same speed (13,291 against 13,135 tokens/s).  The planner sizes a VLM's loss
        # as stock, so the estimate does not move; the trainer takes the chunk from the plan.
        setup = replace(setup, loss_chunk_bytes=SMALL_LOSS_CHUNK)
        est, allocated, device = _sized(ctx, setup, tokens, sequences)
        est.notes.append(
            f"the loss computes its logits in {SMALL_LOSS_CHUNK >> 20} MiB chunks: it runs inside the "
            "vision-language graphs, in their pool"
        )
    if (
        graphs
        and device > ctx.budget_bytes
        and not (setup.preference or vlm)  # a VLM with graphs took the small chunk above
        and setup.loss_chunk_bytes > SMALL_LOSS_CHUNK
    ):
        # smaller logits chunks take memory off the step's peak, which the pool holds a second time
        small = replace(setup, loss_chunk_bytes=SMALL_LOSS_CHUNK)
        s_est, s_allocated, s_device = _sized(ctx, small, tokens, sequences)
        if s_device <= ctx.budget_bytes:
            s_est.notes.append(
                f"the loss computes its logits in {SMALL_LOSS_CHUNK >> 20} MiB chunks (not {setup.loss_chunk_bytes >> 20}) "
                "so that the CUDA graphs' pool fits"
            )
            setup, est, allocated, device = small, s_est, s_allocated, s_device
    if graphs and device > ctx.budget_bytes:
        # the graphs' pool does not fit: the trainer refuses to capture (cuda_graphs._room_for_capture)
        # and this candidate trains eagerly, host-bound, in the memory of an eager step (with the
        # default logits chunk where that fits, else the smaller one)
        need = (device - ctx.budget_bytes) / GIB
        chunks = [setup.loss_chunk_bytes]
        if not (setup.preference or vlm) and SMALL_LOSS_CHUNK not in chunks:
            chunks.append(SMALL_LOSS_CHUNK)
        # a VLM's tower and language graphs (parts vision_graphs, language_graphs) refuse the same way
        no_graphs = replace(setup, cuda_graphs=False, vision_graphs=False)
        sized = [_sized(ctx, replace(no_graphs, loss_chunk_bytes=c), tokens, sequences) for c in chunks]
        pick = next((i for i, (_e, _a, d) in enumerate(sized) if d <= ctx.budget_bytes), None)
        if pick is None:
            pick = min(range(len(sized)), key=lambda i: sized[i][2])
        est, allocated, device = sized[pick]
        setup = replace(no_graphs, loss_chunk_bytes=chunks[pick])
        refused = (
            f"CUDA graphs off: their pool would need {need:.2f} GiB more than the budget, so this plan trains "
            "eagerly (slower: the host launches every kernel)"
        )
        est.notes.append(refused)
        # the step-time model has no term for a VLM's graphs, so its eager step is timed as before
        graphs, eager = False, not vlm
    grad_accum = ctx.effective_batch // micro_batch
    t = step_time_s(
        ctx.shape,
        setup,
        checkpointing,
        sequences,
        grad_accum,
        ctx.row_tokens_mean,
        ctx.max_length,
        ctx.packing and not setup.preference,
        eager_host_bound=eager,
    )
    if setup.preference:
        t *= 1.5  # the reference forward: a forward without backward, about half the policy's work
    return _Candidate(
        micro_batch,
        grad_accum,
        checkpointing,
        every,
        est,
        device,
        allocated,
        t,
        device <= ctx.budget_bytes,
        graphs,
        setup.loss_chunk_bytes,
        refused,
    )


def _allowed(ctx: PlanContext, constraints: Constraints | None = None) -> list[tuple[Checkpointing, int, int]]:
    """(checkpointing, micro_batch, every_n_layers) candidates the constraints allow."""
    c = ctx.constraints if constraints is None else constraints
    modes = rungs(ctx.shape.layers, c.checkpointing)
    if ctx.strategy == "fsdp2":  # FSDP2 recomputes on the GPU (sftop.engine.train.fsdp.OFF_REASONS)
        modes = [m for m in modes if m[0] != "offload"] or [("on", 1)]
    if c.micro_batch:
        sizes = [c.micro_batch]
    elif c.grad_accum:
        sizes = [ctx.effective_batch // c.grad_accum]
    else:
        sizes = divisors(ctx.effective_batch)
    return [(m, b, n) for m, n in modes for b in sizes]


def _plan_from(ctx: PlanContext, chosen: _Candidate, candidates: list[_Candidate], reason: str) -> Plan:
    fitting = [c for c in candidates if c.fits]
    best_time = min(c.time_s for c in fitting) if fitting else chosen.time_s
    budget_gib = ctx.budget_bytes / GIB
    listing = [
        {
            "micro_batch": c.micro_batch,
            "grad_accum": c.grad_accum,
            "gradient_checkpointing": c.checkpointing,
            "checkpoint_every_n_layers": c.every,
            "predicted_peak_gib": round(c.device_bytes / GIB, 3),
            "fits": c.fits,
            "relative_step_time": round(c.time_s / best_time, 3),
            "cuda_graphs": c.graphs,
            "loss_chunk_mib": c.loss_chunk_bytes >> 20,
        }
        for c in sorted(candidates, key=lambda c: c.key())
    ]
    breakdown = chosen.estimate.breakdown_gib()
    if ctx.calibration != 1.0:
        breakdown["probe_correction"] = round((chosen.allocated_bytes - chosen.estimate.allocated_bytes) / GIB, 4)
    per_gpu = [
        {
            "device": dev,
            "name": name,
            "uuid": uuid,
            "predicted_peak_gib": round(chosen.device_bytes / GIB, 3),
            "budget_gib": round(budget / GIB, 3),
            "headroom_gib": round((budget - chosen.device_bytes) / GIB, 3),
        }
        for dev, name, uuid, budget in ctx.per_gpu
    ]
    return Plan(
        world_size=ctx.world_size,
        strategy=ctx.strategy,
        strategy_reason=ctx.strategy_reason,
        per_gpu=per_gpu,
        micro_batch=chosen.micro_batch,
        grad_accum=chosen.grad_accum,
        effective_batch=ctx.effective_batch * ctx.world_size,
        tokens_per_micro_batch=chosen.estimate.tokens,  # DPO: chosen + rejected of each pair
        packing=ctx.packing and not ctx.setup.preference,
        max_length=ctx.max_length,
        gradient_checkpointing=chosen.checkpointing,
        checkpoint_every_n_layers=chosen.every,
        gpu_uuid=ctx.gpu_uuid,
        load_in_4bit=ctx.setup.load_in_4bit,
        device=ctx.device,
        gpu_name=ctx.gpu_name,
        predicted_peak_gib=round(chosen.device_bytes / GIB, 3),
        predicted_allocated_gib=round(chosen.allocated_bytes / GIB, 3),
        budget_gib=round(budget_gib, 3),
        headroom_gib=round(budget_gib - chosen.device_bytes / GIB, 3),
        breakdown=breakdown,
        predicted_relative_step_time=round(chosen.time_s / best_time, 3),
        modelled_step_s=chosen.time_s,
        candidates=listing,
        reason=reason,
        notes=list(ctx.notes) + chosen.estimate.notes,
        model_name=ctx.model_name,
        dtype=ctx.setup.dtype,
        kernels=ctx.setup.kernels,
        loss=ctx.setup.loss,
        attention=ctx.setup.attention,
        varlen_native_gqa=ctx.setup.varlen_native_gqa,
        lora_r=ctx.setup.lora_r,
        optimizer=ctx.setup.optimizer,
        max_memory_gib=None if ctx.cap is None else round(ctx.cap.gib, 3),
        memory_cap=None if ctx.cap is None else ctx.cap.text,
        split_by=ctx.split_by if ctx.packing and ctx.packed_tokens and not ctx.setup.preference else "rows",
        loss_chunk_mib=None if chosen.loss_chunk_bytes == FUSED_CE_CHUNK_BYTES else chosen.loss_chunk_bytes >> 20,
        graphs_refused=chosen.graphs_refused,
        context=ctx,
    )


def solve(ctx: PlanContext) -> Plan:
    """The fastest candidate that fits, or ResourceError naming what would fit."""
    candidates = [_candidate(ctx, m, b, n) for m, b, n in _allowed(ctx)]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise _refusal(ctx, candidates)
    chosen = min(fitting, key=lambda c: c.key())
    reason = _why(ctx, chosen, candidates)
    return _plan_from(ctx, chosen, candidates, reason)


def _why(ctx: PlanContext, chosen: _Candidate, candidates: list[_Candidate]) -> str:
    where = f"{ctx.budget_bytes / GIB:.1f} GiB budget on {ctx.device}" + (f" ({ctx.gpu_name})" if ctx.gpu_name else "")
    cap = _binding_cap(ctx)
    if cap is not None:
        where += f", capped by {cap.text}"
    split = (
        f"{ctx.effective_batch} rows/step in {chosen.grad_accum} micro-batch"
        f"{'es' if chosen.grad_accum > 1 else ''} by tokens"
        if ctx.split_by == "tokens"
        else f"micro-batch {chosen.micro_batch} x {chosen.grad_accum}"
    )
    text = (
        f"fastest of {sum(c.fits for c in candidates)} fitting candidates (of {len(candidates)}) in the {where}: "
        f"{split}, checkpointing {chosen.label}"
    )
    faster_unfit = [c for c in candidates if not c.fits and c.key() < chosen.key()]
    if faster_unfit:
        best = min(faster_unfit, key=lambda c: c.key())
        text += (
            f"; micro-batch {best.micro_batch} with checkpointing {best.label} would be faster but needs "
            f"{best.device_bytes / GIB:.1f} GiB"
        )
    return text


def _smallest(ctx: PlanContext, constraints: Constraints | None = None) -> _Candidate:
    return min((_candidate(ctx, m, b, n) for m, b, n in _allowed(ctx, constraints)), key=lambda c: c.device_bytes)


def _refusal(ctx: PlanContext, candidates: list[_Candidate]) -> ResourceError:
    smallest = min(candidates, key=lambda c: c.device_bytes)
    need = smallest.device_bytes / GIB
    have = ctx.budget_bytes / GIB
    where = ctx.device + (f" ({ctx.gpu_name})" if ctx.gpu_name else "")
    options: list[str] = []
    if _cap_binds(ctx):
        options.append(_raise_cap_option(ctx, smallest.device_bytes))

    def fits_with(label: str, new_ctx: PlanContext, constraints: Constraints | None = None) -> bool:
        c = _smallest(new_ctx, constraints)
        if c.device_bytes <= ctx.budget_bytes:
            options.append(f"{label} (needs {c.device_bytes / GIB:.1f} GiB)")
            return True
        return False

    if ctx.constraints != Constraints():
        fits_with('set plan.micro_batch, plan.grad_accum and plan.gradient_checkpointing to "auto"', ctx, Constraints())
    if not ctx.setup.load_in_4bit:
        fits_with("set model.load_in_4bit = true (QLoRA)", replace(ctx, setup=replace(ctx.setup, load_in_4bit=True)))
    length = ctx.max_length // 2
    while length >= 128:
        if fits_with(f"set data.max_length = {length}", replace(ctx, max_length=length)):
            break
        length //= 2
    for r in (8, 4):
        if r < ctx.setup.lora_r and fits_with(f"set lora.r = {r}", replace(ctx, setup=replace(ctx.setup, lora_r=r))):
            break
    if ctx.setup.optimizer == "adamw":
        fits_with('set train.optimizer = "adamw_8bit"', replace(ctx, setup=replace(ctx.setup, optimizer="adamw_8bit")))
    reserve = _reserve_bytes(ctx.budget_bytes) / GIB
    gpu = next((g for g in COMMON_GPUS if g[1] - reserve >= need), None)
    if _cap_binds(ctx):
        pass  # the GPU is big enough: the cap is what to change
    elif gpu:
        options.append(f"use a GPU with at least {gpu[0]} GB such as {gpu[2]}")
    else:
        options.append("no single common GPU is large enough as configured")
    desc = f"micro-batch {smallest.micro_batch}, checkpointing {smallest.label}"
    cap = _binding_cap(ctx)
    limit = (
        f"{cap.text} allows {have:.2f} GiB on {where}" if cap is not None else f"{where} has {have:.2f} GiB to spare"
    )
    what = (
        f"{ctx.model_name} does not fit: the smallest plan ({desc}, {ctx.max_length} tokens per row"
        + (", 4-bit" if ctx.setup.load_in_4bit else "")
        + f") needs {need:.2f} GiB but {limit}"
    )
    hint = (
        "Changes that would fit: " + "; ".join(options) + ". Check any size with `sftop plan PRESET --gpu-memory GIB`"
    )
    err = ResourceError(what, where="GPU memory", hint=hint)
    err.needed_gib = need
    err.options = options
    return err


def _cap_binds(ctx: PlanContext) -> bool:
    """Is the user's memory cap, not the GPU's free memory, what limits this plan?"""
    return _binding_cap(ctx) is not None


def _binding_cap(ctx: PlanContext) -> MemoryCap | None:
    """The user's memory cap where it, not the GPU's free memory, limits this plan; else None."""
    cap = ctx.cap
    if cap is not None and ctx.uncapped_budget_bytes is not None and cap.bytes < ctx.uncapped_budget_bytes:
        return cap
    return None


def _raise_cap_option(ctx: PlanContext, need_bytes: int) -> str:
    """The refusal's advice on the cap: the value that fits, if the GPU itself has the room."""
    assert ctx.cap is not None and ctx.uncapped_budget_bytes is not None
    if need_bytes > ctx.uncapped_budget_bytes:
        return (
            f"raising {ctx.cap.key} would not help alone: even the GPU's "
            f"{ctx.uncapped_budget_bytes / GIB:.2f} GiB to spare are too few"
        )
    if ctx.cap.key == "plan.max_memory_fraction" and ctx.gpu_total_bytes:
        fraction = math.ceil(100 * need_bytes / ctx.gpu_total_bytes) / 100
        return f"raise plan.max_memory_fraction to {fraction:.2f} (needs {need_bytes / GIB:.1f} GiB), or remove it"
    gib = math.ceil(10 * need_bytes / GIB) / 10
    return f"raise plan.max_memory_gib to {gib:.1f} (the smallest plan's need), or remove it"


def _apply_cap(preset: Any, budget: int, total: int, notes: list[str]) -> tuple[int, MemoryCap | None]:
    """The budget under the user's memory cap, and the cap (None without one)."""
    cap = memory_cap(preset.plan, total)
    if cap is None:
        return budget, None
    if cap.bytes >= budget:
        notes.append(
            f"{cap.text} is more than the {budget / GIB:.1f} GiB this GPU has to spare; the plan uses what is free"
        )
        return budget, cap
    notes.append(f"capped at {cap.gib:.2f} GiB by {cap.text} ({budget / GIB:.1f} GiB would be free)")
    return cap.bytes, cap


def _reserve_bytes(total_bytes: int) -> int:
    """Memory left untouched on the GPU: driver growth, other processes' spikes, NCCL and friends."""
    return int(max(0.25 * GIB, 0.02 * total_bytes))


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * GIB


def plan_run(
    preset: Any,
    model_config: Any,
    *,
    gpus: GpuStatus | None = None,
    gpu_memory_gib: float | None = None,
    row_tokens_mean: float | None = None,
    image_tokens_per_row: Any = None,
) -> Plan:
    """Plan a run of `preset` for the model described by `model_config` (no weights are loaded).

    gpus: the GPUs to plan for (read through NVML when None). gpu_memory_gib: plan for a
    hypothetical empty GPU of that many GiB instead. row_tokens_mean: mean tokens per row from
    the data check; it only changes the speed ranking (default: a quarter of max_length).
    image_tokens_per_row: a VLM's exact image tokens per row from the data check (without it, one
    image per row at the pixel budget is assumed).
    Raises ResourceError when nothing fits, PresetError for contradictory plan.* values.
    """
    shape = ModelShape.from_config(model_config)
    vision_notes: list[str] = []

    def with_images(setup: Setup) -> Setup:
        from sftop.engine.planner.vision import vision_setup

        return vision_setup(setup, preset, model_config, shape, image_tokens_per_row, vision_notes)

    constraints = constraints_from_preset(preset)
    notes: list[str] = []
    gpu_name = gpu_uuid = None
    if gpu_memory_gib is not None:
        if gpu_memory_gib <= 0:
            raise PresetError(
                f"--gpu-memory must be positive, not {gpu_memory_gib}", hint="Give a size in GiB, e.g. 24"
            )
        total = int(gpu_memory_gib * GIB)
        device, gpu_name = "cuda:0", f"hypothetical {gpu_memory_gib:g} GiB GPU"
        budget = total - _reserve_bytes(total)
    else:
        status = gpus if gpus is not None else read_gpus()
        best = status.best()
        if best is None:
            reason = status.reason or (
                "NVML reports no memory figures for the visible GPUs" if status.gpus else "no GPU is visible"
            )
            return _plan_cpu(preset, shape, constraints, reason, row_tokens_mean, with_images, vision_notes)
        device, gpu_name, gpu_uuid = best.device, best.name, best.uuid
        free, total = best.memory_free_bytes or 0, best.memory_total_bytes or best.memory_free_bytes or 0
        budget = free - _reserve_bytes(total)
        used_by_others = best.memory_used_bytes or 0
        if used_by_others > 0.5 * GIB:
            notes.append(f"other processes hold {used_by_others / GIB:.1f} GiB on {device}; the plan uses what is left")
        others = [g for g in status.gpus if g is not best]
        if others:
            notes.append(
                f"planned for {device}, the GPU with the most free memory; sftop trains on one GPU "
                f"({len(others)} other visible)"
            )
    setup = with_images(setup_from_preset(preset, device))
    notes += vision_notes
    if setup.kernels and not kernels_cover(shape):
        # patch_model leaves such a model stock, and the fused path needs far less memory: sizing
        # it as fused would under-predict.
        setup = replace(setup, kernels=False, loss="chunked")
        notes.append(
            f"sftop's fused kernels do not cover model type '{shape.model_type}'"
            + (" (a vision-language model)" if shape.multimodal else "")
            + "; sized for the stock path"
        )
    # a VLM is sized for the stock layers, but its packed rows still get the packed attention part
    # where a kernel family file describes it (varlen_attention.packed_attention_config)
    kernel_parts = setup.kernels or (shape.multimodal and preset.train.kernels != "off")
    if kernel_parts and setup.packed and setup.attention == "sdpa" and device != "cpu" and gpu_memory_gib is None:
        # Only for a GPU that is here: a hypothetical one may be too old for flash attention, and
        # sizing for the SDPA mask over-estimates, which is the safe side.
        from sftop.kernels.varlen_attention import (
            config_supported,
            native_gqa,
            packed_attention_config,
            varlen_available,
        )

        if varlen_available()[0] and config_supported(packed_attention_config(model_config), setup.dtype)[0]:
            setup = replace(setup, attention="varlen", varlen_native_gqa=native_gqa())
    notes += _target_notes(preset)
    if setup.optimizer == "adamw_8bit" and setup.dtype == "fp32" and device == "cpu":
        notes.append("adamw_8bit needs bitsandbytes on a GPU")
    uncapped = max(0, budget)
    budget, cap = _apply_cap(preset, uncapped, total, notes)
    ctx = _context(preset, shape, setup, constraints, max(0, budget), device, gpu_name, row_tokens_mean)
    ctx.notes = notes
    ctx.gpu_uuid = gpu_uuid
    ctx.cap, ctx.uncapped_budget_bytes, ctx.gpu_total_bytes = cap, uncapped, total
    return solve(ctx)


def _context(
    preset: Any,
    shape: ModelShape,
    setup: Setup,
    constraints: Constraints,
    budget: int,
    device: str,
    gpu_name: str | None,
    row_tokens_mean: float | None,
) -> PlanContext:
    max_length = int(preset.data.max_length)
    mean = float(row_tokens_mean) if row_tokens_mean else max(1.0, max_length / 4)
    return PlanContext(
        shape=shape,
        setup=setup,
        model_name=preset.model.name,
        max_length=max_length,
        # what the setup packs: a VLM family that cannot pack (planner/vision.py) pads its rows
        packing=bool(preset.data.packing) and (setup.packed or setup.preference),
        effective_batch=int(preset.train.effective_batch),
        row_tokens_mean=min(mean, max_length),
        budget_bytes=budget,
        device=device,
        gpu_name=gpu_name,
        constraints=constraints,
    )


def _plan_cpu(
    preset: Any,
    shape: ModelShape,
    constraints: Constraints,
    reason: str,
    row_tokens_mean: float | None,
    with_images=lambda setup: setup,
    vision_notes: Sequence[str] = (),
) -> Plan:
    name = preset.model.name
    # The GPU reader's reason ends in "sftop will plan for the CPU": true for `sftop doctor`, but
    # here the plan says what happens on the CPU itself (and a refusal must not promise it).
    reason = reason.replace("; sftop will plan for the CPU", "")
    if shape.total_params > CPU_MAX_PARAMS:
        raise ResourceError(
            f"No usable GPU ({reason}), and {name} ({shape.total_params / 1e9:.2f} B parameters) is too big to "
            "train on the CPU",
            where="GPU",
            hint="Run on a machine with an NVIDIA GPU; `sftop plan PRESET --gpu-memory GIB` shows what size it "
            "needs. The `demo` preset trains on the CPU",
        )
    from sftop.engine.train.fsdp import cpu_4bit_allowed

    if preset.model.load_in_4bit and not cpu_4bit_allowed():
        raise ResourceError(
            f"No usable GPU ({reason}), and model.load_in_4bit needs a CUDA GPU",
            where="model.load_in_4bit",
            hint="Set model.load_in_4bit = false to train this small model on the CPU, or run on a GPU machine",
        )
    setup = with_images(setup_from_preset(preset, "cpu"))
    # Leave most of the RAM to the OS, the data pipeline and the tokenizer.
    budget = int(0.7 * _host_available_bytes())
    ctx = _context(preset, shape, setup, constraints, budget, "cpu", None, row_tokens_mean)
    ctx.notes = list(vision_notes)  # the missing GPU is said once, in the reason
    if preset.plan.max_memory_gib is not None or preset.plan.max_memory_fraction is not None:
        ctx.notes.append("plan.max_memory_gib / plan.max_memory_fraction cap GPU memory; a CPU run ignores them")
    plan = solve(ctx)
    plan.reason = f"training on the CPU because there is no usable GPU ({reason}); " + plan.reason
    return plan


@dataclass(frozen=True)
class SplitByTokens:
    """The trainer's row order for token-balanced micro-batches: its seed, the epochs it covers and
    whether its steps are composed of about equal tokens (train.equal_token_steps)."""

    seed: int
    epochs: int
    balanced: bool = True


def packed_token_bounds(lengths, most_rows: int, multiple: int = 1) -> tuple[int, ...]:
    """(tokens of the longest row, of the two longest, ..., of the `most_rows` longest), each rounded
    up to `multiple` (the trainer's bucket padding): the largest packed micro-batch of b rows."""
    longest = sorted((int(n) for n in lengths), reverse=True)[:most_rows]
    bounds, total = [], 0
    for n in longest:
        total += n
        bounds.append(-(-total // multiple) * multiple)
    return tuple(bounds)


def size_for_data(plan: Plan, lengths, multiple: int = 1, split: SplitByTokens | None = None) -> Plan:
    """Solve a packed plan again with the rows' real lengths.

    The trainer packs exactly micro_batch rows into one micro-batch, so no micro-batch can hold
    more tokens than its micro_batch longest rows: sizing for that instead of micro_batch x
    max_length is exact, never under, and lets a small GPU (or a memory cap) take a bigger
    micro-batch or less recomputation when rows are mostly short. Constraints, budget and any
    probe correction are kept. Plans that do not pack are returned as they are.

    With `split` the trainer takes sftop's own row order and splits each step's rows into
    micro-batches of about equal tokens (sftop.engine.planner.token_split): every micro-batch of the
    run is then known, and each candidate is sized for the largest one that will occur.
    """
    ctx = plan.context
    if ctx is None or not plan.packing or not lengths:
        return plan
    bounds = packed_token_bounds(lengths, ctx.effective_batch, multiple)
    split_by = "rows"
    if split is not None:
        from sftop.engine.planner.token_split import split_bounds

        exact = split_bounds(lengths, ctx.effective_batch, split.seed, split.epochs, multiple, split.balanced)
        # exact for the micro-batch sizes the planner makes (divisors); the b-longest bound elsewhere
        bounds = tuple(e or b for e, b in zip(exact, bounds))
        split_by = "tokens"
    mean = sum(lengths) / len(lengths)
    return solve(replace(ctx, packed_tokens=bounds, row_tokens_mean=min(mean, ctx.max_length), split_by=split_by))


def replan(
    plan: Plan,
    *,
    calibration: float | None = None,
    constraints: Constraints | None = None,
    budget_bytes: int | None = None,
) -> Plan:
    """Solve again from a plan's context with a measured correction, other constraints or budget."""
    if plan.context is None:
        raise ValueError("this plan has no context to re-solve from")
    ctx = plan.context
    ctx = replace(
        ctx,
        calibration=ctx.calibration if calibration is None else calibration,
        constraints=ctx.constraints if constraints is None else constraints,
        budget_bytes=ctx.budget_bytes if budget_bytes is None else budget_bytes,
    )
    return solve(ctx)
