"""Load the base model (hub id, local directory or built-in), optionally in 4-bit, and add LoRA.

The dtype, attention implementation and device are resolved here once and reported in `info`,
so the run's `preset.toml` and `run_started` event record what was actually used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftop.engine.errors import ModelError
from sftop.engine.models.tokenizer import hub_call, load_tokenizer

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class ModelInfo:
    """What was loaded and how; `to_dict()` goes into the `run_started` event."""

    source: str
    device: str
    dtype: str  # "bf16" | "fp16" | "fp32"
    attn_implementation: str
    load_in_4bit: bool
    params_total: int = 0
    params_trainable: int = 0
    kernels: dict[str, Any] = field(default_factory=dict)
    vision_family: str | None = None  # a vision-language model's family (sftop.engine.models.vision)

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"vision_family": self.vision_family} if self.vision_family else {}),
            "source": self.source,
            "device": self.device,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "load_in_4bit": self.load_in_4bit,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
        }


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(requested: str, on_cuda: bool | None = None) -> str:
    """`auto` -> bf16 where the GPU supports it, else fp16; fp32 on CPU."""
    import torch

    on_cuda = cuda_available() if on_cuda is None else on_cuda
    if not on_cuda:
        if requested == "fp16":
            raise ModelError(
                "fp16 training needs a CUDA GPU and none is available",
                where="model.dtype",
                hint='Set model.dtype = "auto" (fp32 on CPU) or run on a machine with a GPU',
            )
        return "bf16" if requested == "bf16" else "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ModelError(
            f"This GPU ({torch.cuda.get_device_name()}) does not support bf16",
            where="model.dtype",
            hint='Set model.dtype = "fp16" or "auto"',
        )
    return requested


def resolve_attn_implementation(requested: str, dtype: str, on_cuda: bool | None = None) -> str:
    on_cuda = cuda_available() if on_cuda is None else on_cuda
    if requested == "flash_attention_2" and not (on_cuda and dtype in ("bf16", "fp16")):
        raise ModelError(
            "flash_attention_2 needs a CUDA GPU and bf16/fp16 weights",
            where="model.attn_implementation",
            hint='Set model.attn_implementation = "auto"',
        )
    if requested != "auto":
        return requested
    if on_cuda and dtype in ("bf16", "fp16"):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def lora_config(lora_section):
    from peft import LoraConfig

    targets = lora_section.targets
    return LoraConfig(
        r=lora_section.r,
        lora_alpha=lora_section.alpha,
        lora_dropout=lora_section.dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        task_type="CAUSAL_LM",
        bias="none",
    )


def _quantization_config(dtype: str, quant_storage: str | None = None):
    """NF4 with double quantization; `quant_storage` packs the 4-bit weights into that dtype's
    elements (FSDP2 shards only floating-point tensors: FSDP-QLoRA stores them in the compute dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means no 4-bit
        raise ModelError(
            f"4-bit loading needs bitsandbytes, which cannot be imported ({exc})",
            where="model.load_in_4bit",
            hint="Install it with `pip install bitsandbytes`, or set model.load_in_4bit = false",
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, _DTYPE_NAMES[dtype]),
        **({"bnb_4bit_quant_storage": getattr(torch, _DTYPE_NAMES[quant_storage])} if quant_storage else {}),
    )


def from_pretrained_kwargs(
    model_section, dtype: str, attn: str, *, skip_4bit: list[str] | None = None
) -> dict[str, Any]:
    """`from_pretrained`'s keyword arguments for a preset's model section: dtype, attention, revision,
    and the 4-bit config (`skip_4bit`: modules kept 16-bit, e.g. a VLM's vision tower)."""
    import torch

    on_cuda = cuda_available()
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, _DTYPE_NAMES[dtype]),
        "attn_implementation": attn,
        "revision": model_section.revision,
        "trust_remote_code": model_section.trust_remote_code,
    }
    from sftop.engine.train.fsdp import cpu_4bit_allowed, fsdp2_active, load_4bit_on_cpu

    if model_section.load_in_4bit:
        if not on_cuda and not cpu_4bit_allowed():
            raise ModelError(
                "4-bit (QLoRA) loading needs a CUDA GPU and none is available",
                where="model.load_in_4bit",
                hint="Set model.load_in_4bit = false, or run on a machine with an NVIDIA GPU",
            )
        quant = _quantization_config(dtype, quant_storage=dtype if fsdp2_active() else None)
        if skip_4bit is not None:
            quant.llm_int8_skip_modules = skip_4bit
        kwargs["quantization_config"] = quant
    if model_section.load_in_4bit and (not on_cuda or load_4bit_on_cpu()):
        # FSDP-QLoRA quantized in host memory (CPU ranks, or 4-bit weights too big for one GPU):
        # FSDP2 then moves each rank's shard to its device
        kwargs["device_map"] = {"": "cpu"}
    elif on_cuda:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        if fsdp2_active() and not model_section.load_in_4bit:
            # FSDP2: rank 0 reads the 16-bit weights into CPU memory and each GPU receives its shard
            # (a whole copy per GPU is what does not fit)
            del kwargs["device_map"]
    return kwargs


def load_base_model(model_section, *, dtype: str | None = None, attn_implementation: str | None = None):
    """The base causal LM alone (no LoRA). Used for training and for merged export."""
    from transformers import AutoModelForCausalLM

    on_cuda = cuda_available()
    dtype = dtype or resolve_dtype(model_section.dtype, on_cuda)
    attn = attn_implementation or resolve_attn_implementation(model_section.attn_implementation, dtype, on_cuda)
    kwargs = from_pretrained_kwargs(model_section, dtype, attn)

    def load(source, local_files_only):
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=local_files_only, **kwargs)

    model = hub_call(model_section, "model", load)
    return model, dtype, attn


def apply_kernels(model, mode: str) -> dict[str, Any]:
    """Patch in sftop's fused kernels. Any failure leaves the stock model and says why."""
    if mode == "off":
        return {"enabled": False, "reason": "train.kernels = off"}
    from sftop.engine.train.fsdp import OFF_REASONS, fsdp2_active

    if fsdp2_active():
        return {"enabled": False, "reason": "FSDP2: " + OFF_REASONS["kernels"]}
    if mode == "auto" and not cuda_available():
        # On CPU the Triton kernels could only run in the (very slow) interpreter.
        return {"enabled": False, "reason": "no CUDA GPU: stock PyTorch layers"}
    try:
        from sftop.kernels import patch_model

        report = patch_model(model)
        data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        return {"enabled": bool(getattr(report, "any_fused", True)), **data}
    except Exception as exc:  # noqa: BLE001 - kernels are an optimisation, never a reason to fail
        if mode == "on":
            raise ModelError(
                f"train.kernels = on, but sftop's kernels could not be applied ({type(exc).__name__}: {exc})",
                where="train.kernels",
                hint='Set train.kernels = "auto" to fall back to the stock layers',
            ) from None
        return {"enabled": False, "reason": f"kernels unavailable: {type(exc).__name__}: {exc}"}


def load_start_adapter(base, ref: str):
    """`base` with the adapter `model.adapter` names, trainable (its own r/alpha/targets, not lora.*)."""
    from peft import PeftModel

    from sftop.engine.models.adapters import resolve_adapter

    return PeftModel.from_pretrained(base, str(resolve_adapter(ref)), is_trainable=True)


def count_params(model) -> tuple[int, int]:
    """(total, trainable). bitsandbytes packs two 4-bit weights per stored byte: count real parameters."""
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def load_model(preset, plan=None):
    """Return `(model, tokenizer, info)`: the LoRA-wrapped model ready for SFTTrainer.

    `plan` is accepted for symmetry with the trainer (gradient checkpointing is applied by the
    Trainer from the plan); it may be None.
    """
    from peft import get_peft_model

    from sftop.engine.models.vision.loading import load_vision_model, vision_family

    family = vision_family(preset.model)
    if family is not None:  # a vision-language model: the processor takes the tokenizer's place
        return load_vision_model(preset, family)
    tokenizer = load_tokenizer(preset.model)
    base, dtype, attn = load_base_model(preset.model)
    # LoRA's A matrices are drawn from the global RNG: seed it so a run (and its resume) is repeatable.
    from transformers import set_seed

    set_seed(preset.train.seed)
    from sftop.engine.train.checkpointing_api import third_party_checkpointing_reads

    try:
        if getattr(preset.model, "adapter", None):
            model = load_start_adapter(base, preset.model.adapter)
        else:
            with third_party_checkpointing_reads():
                model = get_peft_model(base, lora_config(preset.lora))
    except ValueError as exc:
        raise ModelError(
            f"Cannot add LoRA to this model: {exc}",
            where="lora.targets",
            hint='Use lora.targets = "all-linear", or list module names that exist in the model (e.g. q_proj, v_proj)',
        ) from None
    kernels = apply_kernels(model, preset.train.kernels)
    from sftop.engine.train.fsdp import keep_4bit_layout

    keep_4bit_layout(model)
    total, trainable = count_params(model)
    device = str(next(base.parameters()).device)
    if device == "cpu" and cuda_available():  # FSDP2 loads on the CPU; the shards train on this GPU
        import torch

        device = f"cuda:{torch.cuda.current_device()}"
    info = ModelInfo(
        source=preset.model.name,
        device=device,
        dtype=dtype,
        attn_implementation=attn,
        load_in_4bit=preset.model.load_in_4bit,
        params_total=total,
        params_trainable=trainable,
        kernels=kernels,
    )
    return model, tokenizer, info
