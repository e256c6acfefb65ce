"""Analytic peak memory of one LoRA/QLoRA training step, term by term, from the model's config alone.

The model follows docs/planner.md (and the measurements in the research notes it cites):

    peak allocated = weights + LoRA (params, grads, optimizer states) + cuBLAS workspace
                     + max(loss phase, backward phase)
      loss phase     = saved activations + the loss's own peak
      backward phase = saved activations + dequantised NF4 weights + one recomputed layer
                       (checkpointing) + backward transient + the gradient the loss hands back
    peak on the device = peak allocated + allocator margin + CUDA context

"peak allocated" is what `torch.cuda.max_memory_allocated` reads; the device peak is what NVML
would see and is what must fit in the GPU's free memory.

All sizes are bytes. Per-token terms are multiplied by the tokens in one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Mapping

# torch-free: the kernels' sizes and rules, and the patcher's family table (names only)
from sftop.kernels.constants import (
    DPO_GRAPH_LENGTH_MULTIPLE,
    FUSED_CE_CHUNK_BYTES,
    MLP_DH_CHUNK_BYTES,
    dh_chunk_rows,
    projections_worth_keeping,
)
from sftop.kernels.patching.registry import FAMILIES

GIB = 1024**3
MIB = 1024**2

Checkpointing = Literal["off", "on", "offload"]
LossImpl = Literal["fused", "chunked", "full"]

# The seven projections of a Llama-like decoder block, as PEFT names them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Measured on an H100 with CUDA 13 (research notes §A5); not part of max_memory_allocated.
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
# cuBLAS/cuBLASLt workspaces come from the caching allocator: one per handle, and autograd's
# backward thread holds its own handle, hence two.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MIB
# Reserved ran 4-23% above allocated with the default allocator (research §A5); sftop sets
# expandable_segments, which keeps the low end, so 10% of the memory that changes within a step.
ALLOCATOR_MARGIN = 0.10
# Labels, the counted-row index, the gathered labels (int64 each), the counted mask and the fp32
# per-row loss the fused linear+CE holds per token while it runs.
FUSED_CE_INDEX_BYTES = 8 + 8 + 8 + 1 + 4
# model_type values sftop.kernels.patch_model fuses
KERNEL_FAMILIES = frozenset(FAMILIES)
# TRL's chunked log-prob head: a [4096, 32768] tile in the compute dtype.
TRL_CE_TILE_BYTES = 4096 * 32768 * 2
NF4_BLOCK = 64
NF4_DQ_GROUP = 256  # double quantisation: 8-bit absmax with one fp32 constant per 256 blocks

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, read from an HF config (no weights needed)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn_bias: bool = False
    vision_params: int = 0  # a VLM's vision tower and projector: loaded 16-bit, frozen
    # A VLM's text model: patch_model looks at the outer model_type, which names no text family.
    multimodal: bool = False
    vision: Any = None  # a VLM's VisionShape (sftop.engine.planner.vision), for the image terms

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder blocks' projections: what NF4 quantises."""
        return self.layers * sum(a * b for a, b in self.projection_dims().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus an untied lm_head: these stay 16-bit under NF4."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def small_params(self) -> int:
        """Norm weights and attention biases."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.attn_bias else 0
        return self.layers * (2 * self.hidden + bias) + self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.small_params + self.vision_params

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers `PretrainedConfig` or a plain dict (config.json). VLMs: the text model."""
        cfg = _as_mapping(config)
        from sftop.engine.planner.vision import VisionShape

        vision_shape = VisionShape.from_config(cfg)
        text = cfg.get("text_config")
        vision_params = _vision_params(cfg.get("vision_config"))
        multimodal = text is not None or vision_params > 0
        if text is not None:
            text_cfg = _as_mapping(text)
            # Tying is often declared on the outer config of a VLM.
            if "tie_word_embeddings" not in text_cfg and "tie_word_embeddings" in cfg:
                text_cfg = {**text_cfg, "tie_word_embeddings": cfg["tie_word_embeddings"]}
            cfg = text_cfg
        try:
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            intermediate = int(cfg.get("intermediate_size") or 4 * hidden)
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the model config lacks {exc} needed to size memory") from None
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        model_type = str(cfg.get("model_type") or "unknown")
        # Qwen2 has q/k/v biases without declaring them; others say so with attention_bias.
        attn_bias = bool(cfg.get("attention_bias", model_type.startswith("qwen2")))
        return cls(
            model_type=model_type,
            hidden=hidden,
            intermediate=intermediate,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            attn_bias=attn_bias,
            vision_params=vision_params,
            multimodal=multimodal,
            vision=vision_shape,
        )


def _vision_params(vision: Any) -> int:
    """Approximate size of a ViT tower: per layer 4h^2 attention + an MLP (gated when it says so).

    Qwen2-VL calls the layer count `depth` and the width `embed_dim`; CLIP/SigLIP use the usual names.
    """
    if vision is None:
        return 0
    v = _as_mapping(vision)
    h = int(v.get("hidden_size") or v.get("embed_dim") or 0)
    layers = int(v.get("num_hidden_layers") or v.get("depth") or 0)
    if not h or not layers:
        return 0
    i = int(v.get("intermediate_size") or 4 * h)
    gated = str(v.get("hidden_act", "")).lower() in ("silu", "swiglu")
    per_layer = 4 * h * h + (3 if gated else 2) * h * i
    out = int(v.get("out_hidden_size") or 0)
    projector = 4 * h * (4 * h) + 4 * h * out if out else 0  # Qwen's 2x2 patch merger
    return layers * per_layer + projector


def _as_mapping(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        data = config.to_dict()
        # to_dict() turns a nested sub-config into a dict already; keep the object's attributes too
        # because some configs expose computed values (head_dim) only as attributes.
        for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings"):
            if key not in data and getattr(config, key, None) is not None:
                data[key] = getattr(config, key)
        return data
    return vars(config)


def lora_modules(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Which of the seven projections the LoRA targets name. PEFT's "all-linear" skips lm_head."""
    if targets == "all-linear":
        return PROJECTIONS
    names = set(targets)
    return tuple(p for p in PROJECTIONS if p in names)


@dataclass(frozen=True)
class Setup:
    """Everything besides the model shape and batch that changes memory."""

    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    load_in_4bit: bool = False
    double_quant: bool = True
    # PEFT's prepare_model_for_kbit_training upcasts the non-quantised weights to fp32.
    upcast_non_quantized: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = PROJECTIONS
    lora_dropout: float = 0.0
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    checkpointing: Checkpointing = "off"
    # With "on": checkpoint only every n-th block (transformers' every_n_layers); the others keep
    # their activations, trading memory back for less recomputation.
    checkpoint_every: int = 1
    kernels: bool = True  # sftop's fused RMSNorm, SwiGLU and linear+cross-entropy
    loss: LossImpl = "fused"
    # "varlen": sftop's packed attention (sftop/kernels/varlen_attention.py), which replaces SDPA
    # for padding-free rows: flash attention over row boundaries, no mask.  varlen_native_gqa says
    # whether torch's API takes fewer K/V heads; without it K and V are repeated per query head.
    attention: Literal["sdpa", "eager", "flash_attention_2", "varlen"] = "sdpa"
    varlen_native_gqa: bool = True
    on_gpu: bool = True  # on the CPU there is no CUDA context or cuBLAS workspace
    packed: bool = False  # padding-free rows concatenated into one sequence per micro-batch
    # Preference tuning (DPO): a row is a pair, chosen and rejected run in one forward (the caller
    # passes twice the tokens); a reference forward without gradients runs first (sftop's DPO
    # trainer, sftop/engine/train/dpo.py), before the policy's forward, with none of its tensors.
    preference: bool = False
    # sftop's CUDA graphs may engage: DPO's (sftop/kernels/logprob_graphs.py: a GPU, the fused head,
    # no images) and packed SFT's, one per token-length bucket
    # (sftop/kernels/packed_graphs.py: sftop's packed attention, no dropout).  Where they do,
    # their pool keeps a step's transients for replay, beside which a batch of a length not captured
    # yet runs eagerly.
    cuda_graphs: bool = False
    # A Qwen2.5-VL model's tower blocks and language layers replayed from CUDA graphs
    # (sftop/kernels/patching/vision_graphs.py, language_graphs.py; on unless SFTOP_VISION_GRAPHS=0):
    # their pools keep the tower's working set and the language layers' transients for good, under
    # "offload" checkpointing too (sftop's overlapped copies, which a capture takes)
    vision_graphs: bool = False
    # One chunk's logits in sftop's fused loss (the trainer sets what the plan chose: Plan.loss_chunk_mib)
    loss_chunk_bytes: int = FUSED_CE_CHUNK_BYTES
    # A VLM: image tokens per row from the data check (ImageLoad), and which vision parts LoRA
    # adapts (VisionTraining); both from sftop.engine.planner.vision.
    images: Any = None
    vision_training: Any = None


@dataclass
class Estimate:
    """Peak memory of one step, each term separately (bytes)."""

    terms: dict[str, int]
    allocated_bytes: int  # what torch.cuda.max_memory_allocated should read
    device_bytes: int  # allocated + allocator margin + CUDA context: what must fit in free memory
    peak_phase: str  # "loss" or "backward": where the peak happens
    tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def allocated_gib(self) -> float:
        return self.allocated_bytes / GIB

    @property
    def device_gib(self) -> float:
        return self.device_bytes / GIB

    def breakdown_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 4) for k, v in self.terms.items()}


def weight_bytes(shape: ModelShape, setup: Setup) -> int:
    """The frozen base model as loaded."""
    dt = DTYPE_BYTES[setup.dtype]
    if not setup.load_in_4bit:
        return shape.total_params * dt
    per_param_bits = 4 + (8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_GROUP) if setup.double_quant else 32 / NF4_BLOCK)
    quantised = shape.linear_params * per_param_bits / 8
    other_dt = 4 if setup.upcast_non_quantized else 2
    # The vision tower is kept 16-bit (llm_int8_skip_modules), like embeddings and lm_head.
    return int(quantised + (shape.embedding_params + shape.small_params) * other_dt + shape.vision_params * 2)


def dequant_transient_bytes(shape: ModelShape, setup: Setup) -> int:
    """NF4 matmuls dequantise one weight to 16-bit at a time; backward can overlap two.

    Only there while a block runs, so it counts in the backward phase, not while the loss runs
    (measured: NF4 rows sit exactly one weight pair below their bf16 twins at the loss).
    """
    if not setup.load_in_4bit:
        return 0
    biggest = max(a * b for a, b in shape.projection_dims().values())
    return 2 * biggest * 2


def lora_params(shape: ModelShape, r: int, targets: Iterable[str]) -> int:
    dims = shape.projection_dims()
    return shape.layers * r * sum(sum(dims[name]) for name in targets)


def lora_state_bytes(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Adapters are kept fp32 by PEFT (autocast_adapter_dtype), so are their grads."""
    p = lora_params(shape, setup.lora_r, setup.lora_targets)
    optim = 8 * p if setup.optimizer == "adamw" else 2 * p  # m and v: fp32 each, or 8-bit each
    return {"lora_params": 4 * p, "lora_grads": 4 * p, "optimizer_states": optim}


def kernels_cover(shape: ModelShape) -> bool:
    """Whether sftop.kernels.patch_model fuses this model; otherwise it trains on the stock path."""
    return shape.model_type in KERNEL_FAMILIES and not shape.multimodal


def fused_lora(setup: Setup) -> bool:
    """sftop's LoRA forward replaces PEFT's: the adapter runs in the compute dtype with one addmm,
    so no fp32 copy of the input is kept. It refuses LoRA dropout (sftop/kernels/patching/peft_lora.py)."""
    return setup.kernels and setup.lora_dropout == 0


def mlp_dh_bytes(tokens: int, intermediate: int, dt: int) -> int:
    """The one-Function MLP's dh buffer: the whole [tokens, intermediate] up to MLP_DH_CHUNK_BYTES,
    above it equal token chunks of at most that (rounded up to 128 rows), as lora_mlp.py cuts them."""
    return dh_chunk_rows(tokens, intermediate, dt, MLP_DH_CHUNK_BYTES) * intermediate * dt


def one_function_mlp(setup: Setup) -> bool:
    """The whole LoRA MLP as one autograd Function (sftop/kernels/lora_mlp.py): needs gate, up and
    down all adapted by the fused LoRA path."""
    return fused_lora(setup) and {"gate_proj", "up_proj", "down_proj"} <= set(setup.lora_targets)


# families whose checkpoint recomputation is lean: Gemma's post-norms read the MLP output, so its
# layers recompute in full
LEAN_RECOMPUTE_FAMILIES = frozenset(name for name, spec in FAMILIES.items() if spec.mlp_output_unsaved)


def kept_attention(shape: ModelShape, setup: Setup, masked: bool) -> bool:
    """Whether offloaded checkpointing keeps each layer's attention output for its recomputation
    (sftop/kernels/kept_attention.py): lean recomputation with the one-Function MLP, and unmasked
    causal rows (padded or packed rows take other attention paths)."""
    return (
        setup.checkpointing == "offload"
        and setup.on_gpu
        and one_function_mlp(setup)
        and not masked
        and not setup.packed
        and shape.model_type in LEAN_RECOMPUTE_FAMILIES
        and setup.attention in ("sdpa", "varlen")
        and setup.dtype in ("bf16", "fp16")
    )


# families whose q/k/v projections feed RoPE directly
KEPT_PROJECTIONS_FAMILIES = frozenset(name for name, spec in FAMILIES.items() if spec.qkv_straight_to_rope)


def kept_projections(shape: ModelShape, setup: Setup, masked: bool) -> bool:
    """Whether offloaded checkpointing also keeps each layer's q/k/v (part kept_projections): on
    top of the kept attention output, for layers with the compute to hide the copies."""
    if not (
        kept_attention(shape, setup, masked)
        and shape.model_type in KEPT_PROJECTIONS_FAMILIES
        and {"q_proj", "k_proj", "v_proj"} <= set(setup.lora_targets)
    ):
        return False
    return projections_worth_keeping(
        shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, DTYPE_BYTES[setup.dtype]
    )


def residual_bytes(setup: Setup) -> int:
    """Bytes per element of the residual stream: prepare_model_for_kbit_training's fp32 upcast of
    the embeddings makes it fp32."""
    if setup.load_in_4bit and setup.upcast_non_quantized:
        return 4
    return DTYPE_BYTES[setup.dtype]


def kv_repeated(shape: ModelShape, setup: Setup, masked: bool) -> bool:
    """transformers copies K and V out to every query head (repeat_kv) for eager attention, and for
    SDPA when it passes an explicit mask (its GQA path needs mask None); SDPA then keeps the copies."""
    if shape.kv_heads == shape.heads or setup.attention == "flash_attention_2":
        return False
    if setup.attention == "varlen":
        return not setup.varlen_native_gqa
    if setup.attention == "sdpa" and setup.on_gpu and fused_lora(setup):
        # measured (H200, 2026-12-02): unmasked SDPA on the GPU with sftop's layers keeps ~3 h
        # bytes per token and layer more than K and V -- the repeated copies -- across all three
        # GQA shapes; transformers' enable_gqa path does not avoid the copy there
        return True
    return setup.attention == "eager" or masked


def layer_activation_bytes_per_token(shape: ModelShape, setup: Setup, seq_len: int, masked: bool = False) -> int:
    """Bytes one decoder block saves for backward, per token (HF block + PEFT LoRA, SDPA).

    Stock (research §A3, matched measurement within 1%): bf16 Q, K, V and attention output;
    gate, up and SiLU(gate); the fp32 input each RMSNorm keeps; the fp32 copy of each adapted
    projection's input that PEFT saves for lora_A.

    sftop's kernels with their LoRA path (what each autograd node saves, checked on a tiny model by
    walking the graph): each RMSNorm its input and one fp32 rstd; Q, K, V, the output and the fp32
    log-sum-exp SDPA keeps; the norm output the q/k/v adapters share (o_proj's input is the SDPA
    output itself, the same storage); the one-Function MLP its input, gate and up (h is recomputed
    in backward); each adapter's rank-r product. No fp32 copies.

    `masked`: SDPA gets an explicit mask (packed or padded rows), so K and V are saved repeated.
    """
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    dt = DTYPE_BYTES[setup.dtype]
    kv_saved = q if kv_repeated(shape, setup, masked) else kv
    attention = dt * (2 * q + 2 * kv_saved)
    dims = shape.projection_dims()
    targets = set(setup.lora_targets)
    if fused_lora(setup):
        norms = 2 * (residual_bytes(setup) * h + 4)
        lse = 4 * shape.heads
        mlp = dt * 2 * i  # gate and up pre-activations (one-Function MLP or the fused GLU)
        adapter_inputs = 0
        if targets & {"q_proj", "k_proj", "v_proj"}:
            adapter_inputs += dt * h  # input_layernorm's output, one tensor for all three
        if one_function_mlp(setup) or targets & {"gate_proj", "up_proj"}:
            adapter_inputs += dt * h  # post_attention_layernorm's output
        if not one_function_mlp(setup) and "down_proj" in targets:
            adapter_inputs += dt * i  # the GLU output, input of the down adapter
        rank_products = dt * setup.lora_r * len(targets)
        total = attention + lse + mlp + norms + adapter_inputs + rank_products
    else:
        mlp = dt * (2 * i) if setup.kernels else dt * (3 * i)
        norms = 2 * (dt * h + 4) if setup.kernels else 2 * (4 * h)
        adapted_inputs = sum(dims[name][0] for name in setup.lora_targets)
        total = attention + mlp + norms + 4 * adapted_inputs
        if setup.lora_dropout > 0:
            total += adapted_inputs  # one-byte keep mask per adapted input element
    if setup.attention == "eager":
        total += (4 + dt) * shape.heads * seq_len  # fp32 softmax and its copy, per query token
    return total


def attention_mask_bytes(setup: Setup, tokens: int, seq_len: int) -> tuple[int, int]:
    """(shared mask, float bias saved per attention call) for SDPA/eager with an explicit mask.

    Padding-free packing (one row of `tokens`) and padded rows both make transformers build a 4-D
    boolean mask ([rows, 1, s, s]); torch's SDPA turns it into a float bias in the compute dtype
    and its memory-efficient kernel keeps that bias for backward, once per layer. flash-attention
    takes sequence boundaries instead and needs neither.
    """
    if setup.attention in ("flash_attention_2", "varlen"):
        return 0, 0
    s = tokens if setup.packed else seq_len
    rows = max(1, tokens // s)
    if not setup.packed and rows == 1:
        return 0, 0  # one unpadded row: SDPA runs causal without a mask
    return rows * s * s, rows * s * s * DTYPE_BYTES[setup.dtype]


def checkpointed_layers(shape: ModelShape, setup: Setup) -> int:
    """How many blocks recompute in backward (transformers checkpoints those with index % n == 0)."""
    if setup.checkpointing == "off":
        return 0
    if setup.checkpointing == "offload":
        return shape.layers
    return -(-shape.layers // max(1, setup.checkpoint_every))


def fused_ce_bytes(shape: ModelShape, setup: Setup, tokens: int) -> int:
    """Peak of sftop's fused linear+CE beyond the dX it keeps for backward.

    It computes logits for chunks of rows (at most setup.loss_chunk_bytes each), one chunk live at a
    time. Alongside: the final norm's output, its gathered rows and the dX rows being filled.
    """
    dt = DTYPE_BYTES[setup.dtype]
    per_row = shape.vocab * dt
    rows = max(1, min(tokens, setup.loss_chunk_bytes // per_row))
    return rows * per_row + (3 * dt * shape.hidden + FUSED_CE_INDEX_BYTES) * tokens


def estimate(
    shape: ModelShape, setup: Setup, tokens: int, seq_len: int | None = None, rows: int | None = None
) -> Estimate:
    """Peak memory for a micro-batch of `tokens` tokens: one packed row, or rows of `seq_len` each.
    `rows`: how many rows the micro-batch holds (packed or not), for a VLM's image terms."""
    rows = rows or max(1, tokens // (seq_len or tokens))
    seq_len = tokens if setup.packed else (seq_len or tokens)
    h = shape.hidden
    dt = DTYPE_BYTES[setup.dtype]
    rb = residual_bytes(setup)
    notes: list[str] = []
    terms: dict[str, int] = {}
    terms["weights"] = weight_bytes(shape, setup)
    terms.update(lora_state_bytes(shape, setup))
    terms["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES if setup.on_gpu else 0

    mask, bias = attention_mask_bytes(setup, tokens, seq_len)
    a_layer = layer_activation_bytes_per_token(shape, setup, seq_len, masked=bias > 0)
    final_norm = (rb * h + 4) if setup.kernels else 4 * h
    if setup.checkpointing == "off":
        saved_tok = shape.layers * a_layer + final_norm
        recompute_tok = 0
    elif setup.checkpointing == "on":
        n_ckpt = checkpointed_layers(shape, setup)
        # checkpointed blocks keep their input; the others keep everything
        saved_tok = n_ckpt * rb * h + (shape.layers - n_ckpt) * a_layer + final_norm
        recompute_tok = a_layer
    else:  # offload: block inputs live in pinned host memory; two are on the GPU in flight
        saved_tok = 2 * rb * h + final_norm
        recompute_tok = a_layer
        host_tok = shape.layers * rb * h
        if kept_attention(shape, setup, masked=bias > 0):
            # each layer's attention output goes to host memory too (one more in flight on the
            # GPU), and its fp32 log-sum-exp per query head stays on the GPU
            saved_tok += dt * shape.q_dim + shape.layers * 4 * shape.heads
            host_tok += shape.layers * dt * shape.q_dim
            if kept_projections(shape, setup, masked=bias > 0):
                # and its q/k/v: one more layer's worth in flight (the recomputation takes them
                # back instead of computing them), and every layer's in host memory
                qkv = dt * (shape.q_dim + 2 * shape.kv_dim)
                saved_tok += qkv
                host_tok += shape.layers * qkv
        notes.append(f"offloaded checkpointing keeps {host_tok * tokens / GIB:.2f} GiB of block inputs in CPU RAM")

    # What the loss holds: per-token saved tensors, a fixed transient, and its peak per token.
    if setup.loss == "full":
        # HF ForCausalLMLoss: 16-bit logits, their fp32 copy, fp32 log-softmax and gradients (~14 V measured at the anchors, 12 V in research §A8).
        loss_saved_tok = 0
        loss_peak = 14 * shape.vocab * tokens
        loss_grad_tok = dt * h
    elif setup.loss == "chunked":
        # TRL's chunked log-prob head saves a copy of the scored hidden states; backward
        # accumulates an fp32 gradient for them.
        loss_saved_tok = dt * h + 16
        loss_peak = min(TRL_CE_TILE_BYTES, tokens * 32768 * 2)
        loss_grad_tok = 4 * h + dt * h
    else:
        # sftop's fused linear+CE computes dX in forward and keeps only that for backward.
        loss_saved_tok = dt * h
        loss_peak = fused_ce_bytes(shape, setup, tokens)
        loss_grad_tok = dt * h

    backward_fixed = 0
    if one_function_mlp(setup):
        # The one-Function MLP's backward allocates dh (intermediate width, in token chunks for
        # large batches) and dX, and turns its saved gate/up into their gradients in place; the
        # rest of the block needs less.
        backward_tok = dt * h
        backward_fixed = mlp_dh_bytes(tokens, shape.intermediate, dt)
    else:
        # During one block's backward: gradients of its MLP (gate/up width) and hidden width in flight,
        # net of the saved tensors it frees as it goes (fits the measured GC peak, research §A8).
        backward_tok = 4 * shape.intermediate + 4 * h
        if setup.dtype == "fp32":
            backward_tok *= 2

    dequant = dequant_transient_bytes(shape, setup)
    mask_saved = mask + (shape.layers - checkpointed_layers(shape, setup)) * bias
    mask_recompute = bias if setup.checkpointing != "off" else 0

    saved = (saved_tok + loss_saved_tok) * tokens + mask_saved
    loss_phase = saved + loss_peak
    # (a block's forward holds one dequantised weight and less than its backward: never the peak)
    backward_phase = (
        saved + dequant + (recompute_tok + backward_tok + loss_grad_tok) * tokens + backward_fixed + mask_recompute
    )
    # the reference forward (DPO) runs before the policy's: one block's activations at a time and
    # its log-prob head (no dX kept), none of the policy's tensors yet
    reference_phase = a_layer * tokens + mask + loss_peak if setup.preference else 0
    if reference_phase > max(loss_phase, backward_phase):
        phase = "reference"
        notes.append("peak during the reference forward (chosen and rejected, no gradients)")
        terms["reference_forward"] = a_layer * tokens
        if mask:
            terms["attention_mask"] = mask
        terms["loss_peak"] = loss_peak
    elif loss_phase >= backward_phase:
        terms["activations"] = saved_tok * tokens
        if mask_saved:
            terms["attention_mask"] = mask_saved
        terms["loss_saved"] = loss_saved_tok * tokens
        phase = "loss"
        terms["loss_peak"] = loss_peak
    else:
        terms["activations"] = saved_tok * tokens
        if mask_saved:
            terms["attention_mask"] = mask_saved
        terms["loss_saved"] = loss_saved_tok * tokens
        phase = "backward"
        if dequant:
            terms["dequant_transient"] = dequant
        if recompute_tok:
            terms["recomputed_layer"] = recompute_tok * tokens + mask_recompute
        terms["backward_transient"] = (backward_tok + loss_grad_tok) * tokens + backward_fixed
    if shape.vision is not None and setup.images is not None:
        _add_image_terms(terms, shape, setup, rows, notes)
    pool = graph_pool_bytes(shape, setup, tokens, seq_len, rows)
    if pool:
        terms["graph_pool"] = pool
        notes.append(
            f"CUDA graphs keep {pool / GIB:.2f} GiB of step transients in their pool for replay; a batch of "
            "a length not captured yet runs eagerly beside it"
        )
    if "vision_graph_pool" in terms:
        _share_vision_graph_pool(terms, notes)
    allocated = sum(terms.values())
    dynamic = allocated - terms["weights"] - terms["lora_params"]
    terms["allocator_margin"] = int(ALLOCATOR_MARGIN * dynamic)
    terms["cuda_context"] = CUDA_CONTEXT_BYTES if setup.on_gpu else 0
    device = sum(terms.values())
    return Estimate(
        terms=terms, allocated_bytes=allocated, device_bytes=device, peak_phase=phase, tokens=tokens, notes=notes
    )


# what the captured steps hold for good, not the step's dynamic memory (sized by `estimate` itself)
_STATIC_TERMS = ("weights", "lora_params", "lora_grads", "optimizer_states", "cublas_workspace")


def graph_pool_bytes(shape: ModelShape, setup: Setup, tokens: int, seq_len: int, rows: int) -> int:
    """What sftop's CUDA graphs keep reserved for replay, 0 where they will not engage.

    All captures of a model share one pool (sftop/kernels/cuda_graphs.py), which holds the largest
    of their transients: the eager step's dynamic memory (its saved activations included, which a
    captured forward allocates in the pool too).  The pool is kept for the run, and a batch of a
    length not captured yet (its first sighting, or a shape past the captured ones) runs eagerly in
    the ordinary cache beside it: the pool is counted on top of the step's own peak, as the trainer's
    capture rule (cuda_graphs._room_for_capture) demands room for both.

    DPO: the reference forward and the policy step, at the pair length padded up to the graphs'
    multiple (the graphs pad on the GPU so that lengths repeat), with offloaded checkpointing too
    (sftop's overlapped copies, which a capture takes).
    SFT: packed micro-batches through sftop's packed attention, padded up to their length bucket
    (`tokens` is the largest), without dropout.  Both: plus the one set of gradient buffers every
    captured step shares, which stays beside an eager step's own gradients.  Never without the
    fused loss (kernels off) or on the CPU.
    A VLM: with `vision_graphs` (on unless SFTOP_VISION_GRAPHS=0), whose language layers replay for
    unpacked rows without dropout (sftop/kernels/patching/language_graphs.py): their transients are
    the text terms' dynamic memory.  The tower's pool is an image term (vision_graph_pool)."""
    if setup.images is not None:
        return _language_graph_pool(shape, setup, tokens, seq_len, rows)
    if not (setup.cuda_graphs and setup.on_gpu and setup.kernels and setup.loss == "fused"):
        return 0
    if setup.preference:
        if setup.packed:
            return 0
        seq_len = -(-seq_len // DPO_GRAPH_LENGTH_MULTIPLE) * DPO_GRAPH_LENGTH_MULTIPLE
        tokens = rows * seq_len
    elif not (setup.packed and setup.attention == "varlen") or setup.lora_dropout > 0:
        return 0
    eager = estimate(shape, replace(setup, cuda_graphs=False), tokens, seq_len=seq_len, rows=rows)
    dynamic = eager.allocated_bytes - sum(eager.terms.get(k, 0) for k in _STATIC_TERMS)
    # the captured steps' shared gradient buffers (cuda_graphs.StepGraphs._shared_grads): one set,
    # where each bucket's step once kept its own and a packed Llama-3.2-1B run's memory between
    # steps rose by its 0.042 GiB of LoRA gradients with every bucket captured (docs/benchmarks.md)
    return dynamic + eager.terms["lora_grads"]


def _vision_graphs_engage(shape: ModelShape, setup: Setup) -> bool:
    """A Qwen2.5-VL model's graphs replay: asked for (`vision_graphs`, which setup_from_preset sets
    only where the run patches the kernels), on a GPU, for Qwen2.5-VL (the one gated tower among the
    families, the only model both graph parts take).  Under "offload" checkpointing too: a run that
    patches the kernels offloads through sftop's overlapped copies (part checkpoint_offload), which
    a capture takes.  Not `setup.kernels`: the planner sizes a VLM's layers as stock (kernels_cover)
    while the run patches them and replays these graphs, whose pools must be counted all the same."""
    gated_tower = shape.vision is not None and shape.vision.gated_mlp
    return setup.vision_graphs and setup.on_gpu and gated_tower


def _language_graph_pool(shape: ModelShape, setup: Setup, tokens: int, seq_len: int, rows: int) -> int:
    if not _vision_graphs_engage(shape, setup) or setup.packed or setup.lora_dropout > 0:
        return 0
    # the graphs replay only where the run patches the language layers (vision_graphs is set only
    # then), so their pool holds the patched layers' transients, not the stock ones the planner
    # sizes the eager step by: measured 0.54 GiB reserved on Qwen2.5-VL-3B NF4 under offload
    # (2026-12-07), against 1.26 sized from stock layers and 0.62 from patched ones
    text = replace(setup, images=None, vision_graphs=False, cuda_graphs=False, kernels=True, loss="fused")
    eager = estimate(shape, text, tokens, seq_len=seq_len, rows=rows)
    return eager.allocated_bytes - sum(eager.terms.get(k, 0) for k in _STATIC_TERMS) + eager.terms["lora_grads"]


def _share_vision_graph_pool(terms: dict[str, int], notes: list[str]) -> None:
    """The tower's graphs share the language layers' pool (sftop/kernels/nested_graphs.py; unless
    SFTOP_SHARED_GRAPH_POOL=0) wherever both replay: the tower's steps run before and after the
    language layers', never beside them, so the one pool holds the larger of the two working sets
    and the tower's counts only beyond the language layers' (measured apart on Qwen2.5-VL-3B NF4
    under offload, 2026-12-07: 373 and 406 MiB idle, docs/benchmarks.md)."""
    from sftop.kernels.nested_graphs import sharing_enabled

    tower, language = terms["vision_graph_pool"], terms.get("graph_pool", 0)
    if language and sharing_enabled():
        terms["vision_graph_pool"] = max(0, tower - language)
        notes.append(
            f"the vision tower's CUDA graphs share the language layers' pool: {terms['vision_graph_pool'] / GIB:.2f} "
            f"GiB more for its working set ({tower / GIB:.2f} GiB)"
        )
    else:
        notes.append(f"the vision tower's CUDA graphs keep {tower / GIB:.2f} GiB of its working set in their pool")


def _add_image_terms(terms: dict[str, int], shape: ModelShape, setup: Setup, rows: int, notes: list[str]) -> None:
    """A VLM's pixels, vision tower and projector (sftop.engine.planner.vision), sized for the
    micro-batch of `rows` rows with the most image tokens."""
    from sftop.engine.planner.vision import VisionTraining, image_terms

    load = setup.images
    image_tokens = load.max_tokens(rows)
    static = terms["weights"] + terms["lora_params"] + terms["lora_grads"] + terms["optimizer_states"]
    text_dynamic = sum(terms.values()) - static
    image, transient = image_terms(
        shape.vision,
        setup.vision_training or VisionTraining(),
        image_tokens=image_tokens,
        dtype_bytes=DTYPE_BYTES[setup.dtype],
        checkpointing=setup.checkpointing,
        lora_r=setup.lora_r,
        optimizer_bytes_per_param=8 if setup.optimizer == "adamw" else 2,
    )
    terms.update(image)
    if _vision_graphs_engage(shape, setup) and "vision_activations" in image:
        # Qwen2.5-VL's, the one gated tower among the families (the part graphs no other): the
        # graphs' pool keeps the transients of one adapted block's backward (its recomputed
        # activations, their gradients and its working set), which an eager step frees for the
        # language model, beside the block inputs it holds for the backward (vision_activations)
        from sftop.engine.planner.vision import layer_backward_bytes_per_patch

        patches = image_tokens * shape.vision.patches_per_token
        terms["vision_graph_pool"] = patches * layer_backward_bytes_per_patch(shape.vision, DTYPE_BYTES[setup.dtype])
    if transient > text_dynamic:
        # the vision tower's forward is the step's peak: what it needs beyond the text terms
        terms["vision_forward_transient"] = transient - text_dynamic
    notes.append(
        f"image tokens per micro-batch of {rows}: p95 {load.p95_tokens(rows)}, max {image_tokens} "
        f"({image_tokens * shape.vision.patches_per_token} vision patches); sized for the max"
    )
