"""The typed schema of a preset: every key a `.toml` preset may hold, its type, range and default.

Unknown keys are rejected (`extra="forbid"`) so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Auto = Literal["auto"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field("builtin:demo-tiny", description="Hub id, local directory, or builtin:demo-tiny")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base weights as NF4 (bitsandbytes)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype; auto = bf16 where supported, else fp16; fp32 on CPU"
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    adapter: str | None = Field(
        None,
        description="Start from an earlier run's LoRA adapter: a run directory or name, an adapter "
        "directory, or latest:PRESET (the newest finished run of that preset)",
    )


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; 0 keeps the fused fast path")
    targets: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module names to adapt, or all-linear"
    )
    parts: list[Literal["language", "vision", "attention", "mlp", "projector"]] | None = Field(
        None,
        description="Vision-language models: parts to adapt (language, vision, projector; attention, mlp);"
        " unset = the family's default",
    )

    @field_validator("targets")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value


DataFormat = Literal[
    "auto",
    "messages",
    "sharegpt",
    "prompt_completion",
    "alpaca",
    "text",
    "preference",
    "preference_implicit",
    "ultrafeedback",
]  # the last three: train.task = "dpo"
PREFERENCE_FORMATS = ("preference", "preference_implicit", "ultrafeedback")


class DataSection(_Section):
    source: str = Field("builtin:arithmetic", description="File, directory, hub id, or builtin:NAME")
    format: DataFormat = Field("auto", description="Force a format instead of detecting it")
    split: str = Field("train", description="Split to read from a hub dataset or a saved DatasetDict")
    max_length: int = Field(2048, ge=16, le=1_048_576, description="Longest sequence in tokens")
    packing: bool = Field(True, description="Pack rows into padding-free batches")
    loss_on: Literal["assistant", "all"] = Field("assistant", description="Tokens that are trained on")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Stop when more than this share of rows is unusable"
    )
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="Share of rows held out for eval")
    max_rows: int | None = Field(None, ge=1, description="Use at most this many rows")
    max_pixels: int | None = Field(
        None, ge=1, description="Images: scale down to at most this many pixels (None = the model's default)"
    )
    min_pixels: int | None = Field(
        None, ge=1, description="Images: scale up to at least this many pixels (None = the model's default)"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description='Your column names for sftop\'s, e.g. {prompt = "question", completion = "answer"}',
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value):
        from sftop.engine.data.columns import KNOWN

        unknown = [k for k in value if k not in KNOWN]
        if unknown:
            raise ValueError(f"unknown column name {unknown[0]!r}: map one of {', '.join(KNOWN)}")
        return value


class TrainSection(_Section):
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set")
    epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Passes over the data")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate")
    effective_batch: int = Field(8, ge=1, le=65536, description="Rows per optimizer step")
    seed: int = Field(42, ge=0, description="Seed for data order, init and dropout")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="adamw_8bit needs bitsandbytes")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk")
    eval_steps: int | None = Field(None, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="Consecutive NaN/inf steps (skipped) before the run stops")
    kernels: Literal["auto", "on", "off"] = Field("auto", description="sftop's fused Triton kernels")
    length_buckets: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Pad each packed micro-batch up to one of a few lengths so its CUDA graph replays; "
        "auto = on where CUDA graphs can replay them and the run is long enough for their captures to "
        "pay (lengths fitted to the data); the padding is never trained on or counted as throughput",
    )
    equal_token_steps: Literal["on", "off"] = Field(
        "on",
        description="Compose each optimizer step of a packed run from rows of about equal total tokens "
        "(still exactly effective_batch rows, each row once per epoch): fewer CUDA-graph captures, less "
        "padding, a smaller largest micro-batch; off = consecutive rows of the seeded shuffle. Only "
        "where sftop orders the rows: packed runs whose steps are split by tokens (plan.split_by)",
    )
    task: Literal["sft", "dpo"] = Field("sft", description="sft: supervised; dpo: preference pairs ([dpo])")
    sample_prompts: list[str] = Field(
        default_factory=list,
        description="User prompts the model answers (greedy) at each evaluation; shown in the dashboard",
    )


class PlanSection(_Section):
    micro_batch: Union[Auto, int] = Field("auto", description="Sequences per micro-batch, or auto")
    grad_accum: Union[Auto, int] = Field("auto", description="Micro-batches per optimizer step, or auto")
    gradient_checkpointing: Union[Auto, Literal["off", "on", "offload"]] = Field(
        "auto", description="Recompute activations to save memory"
    )

    split_by: Literal["auto", "tokens", "rows"] = Field(
        "auto",
        description="Packed runs: split each optimizer step's rows into micro-batches of about "
        "equal tokens, sized for the data's largest (auto, tokens), or into micro_batch "
        "rows each in the trainer's own order (rows)",
    )

    max_memory_gib: float | None = Field(
        None,
        gt=0.0,
        le=4096.0,
        description="Most GPU memory this run may use, in GiB (e.g. to share the GPU with an inference "
        "server); the planner, the probe and out-of-memory recovery stay under it and the "
        "trainer's allocator is held to it",
    )
    max_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="The same cap as a share of the GPU's total memory (0.5 = half); set this or "
        "max_memory_gib, not both",
    )

    price_per_gpu_hour: float | None = Field(
        None,
        ge=0.0,
        le=1000.0,
        description="What one GPU-hour costs you, in your currency (rented H100s are typically 2-3 an hour "
        "in USD, A100s 1-2, RTX 4090s under 1); the dashboard shows the run's cost",
    )

    gpus: Union[Auto, int, list[int]] = Field(
        "auto",
        description='GPUs to train on: "auto" (every visible GPU no other process is using), a count, or a list '
        "of CUDA indices; more than one runs data-parallel through accelerate (docs/training.md)",
    )
    device: Literal["auto", "cpu"] = Field(
        "auto",
        description='"cpu" trains on the CPU even with a GPU present; with plan.gpus = N it starts N CPU '
        "processes (gloo), which checks a multi-process run on a machine without GPUs",
    )

    strategy: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto",
        description="Several processes: ddp (a whole model per GPU), fsdp2 (the weights sharded over the GPUs), "
        "or auto (DDP when the model and its activations fit each GPU, FSDP2 when only a shard does)",
    )

    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Machines the run spans (each runs `sftop run` with its own plan.node_rank); more than one "
        "needs plan.main_address",
    )
    node_rank: int = Field(0, ge=0, description="This machine's place among plan.nodes (0 = the main node)")
    main_address: str | None = Field(
        None, description="Address of the main node (plan.node_rank = 0) that the other nodes reach"
    )
    main_port: int = Field(29500, ge=1, le=65535, description="Port on the main node for the processes to meet")

    @model_validator(mode="after")
    def _nodes(self):
        if self.nodes > 1 and not self.main_address:
            raise ValueError(f"plan.nodes = {self.nodes} needs plan.main_address, the main node's address")
        if self.node_rank >= self.nodes:
            raise ValueError(f"plan.node_rank = {self.node_rank} must be below plan.nodes = {self.nodes}")
        return self

    @field_validator("gpus")
    @classmethod
    def _gpu_list(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError('must be at least 1, "auto", or a list of GPU indices')
        if isinstance(value, list):
            if not value:
                raise ValueError('give at least one GPU index, or "auto"')
            if any(v < 0 for v in value) or len(set(value)) != len(value):
                raise ValueError("GPU indices must be distinct and not negative")
        return value

    @field_validator("micro_batch", "grad_accum")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError('must be at least 1, or "auto"')
        return value

    @model_validator(mode="after")
    def _one_memory_cap(self):
        if self.max_memory_gib is not None and self.max_memory_fraction is not None:
            raise ValueError(
                f"plan.max_memory_gib = {self.max_memory_gib:g} and plan.max_memory_fraction = "
                f"{self.max_memory_fraction:g} both cap the run's GPU memory: keep one of them"
            )
        return self

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _bool_alias(cls, value):
        if value is True:
            return "on"
        if value is False:
            return "off"
        return value


DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]


class DpoSection(_Section):
    """Preference tuning (train.task = "dpo"); ignored for SFT."""

    beta: float = Field(0.1, gt=0.0, le=100.0, description="Strength of the pull towards the reference")
    loss_type: DpoLossType = Field("sigmoid", description="TRL's DPO loss variant (sigmoid = DPO, ipo, ...)")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped labels (robust, exo_pair, aot)"
    )
    reference: str = Field(
        "adapter-off", description="adapter-off: the model without the trained adapter; or a model path"
    )
    share_prompt: bool = Field(
        True,
        description="Run each pair's prompt once for both answers (text models, sftop's kernels on a GPU); "
        "the same log-probabilities with less work; false runs TRL's padded pairs",
    )

    @field_validator("reference")
    @classmethod
    def _reference(cls, value):
        if not value.strip():
            raise ValueError('give "adapter-off" or a model path')
        return value

    @model_validator(mode="after")
    def _smoothing(self):
        if self.loss_type == "exo_pair" and self.label_smoothing == 0.0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (its paper suggests 1e-3)")
        return self


class Preset(_Section):
    """A whole preset. Section and key names are part of the public interface: keep them."""

    name: str = Field("unnamed", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    plan: PlanSection = Field(default_factory=PlanSection)
    dpo: DpoSection = Field(default_factory=DpoSection)

    @model_validator(mode="after")
    def _format_fits_task(self):
        if self.data.format in PREFERENCE_FORMATS and self.train.task != "dpo":
            raise ValueError(f'data.format = "{self.data.format}" holds preference pairs: set train.task = "dpo"')
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSection,
    "lora": LoraSection,
    "data": DataSection,
    "train": TrainSection,
    "plan": PlanSection,
    "dpo": DpoSection,
}
