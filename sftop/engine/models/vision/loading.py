"""Load a vision-language model (hub id, local directory or built-in) with its processor, and add LoRA.

The same path as a text model (`sftop.engine.models.loading`), with what a VLM needs on top:
- the family (from the config's `model_type`) picks the model class and the LoRA targets by part;
- QLoRA quantises the language model only: the vision tower and the projector stay 16-bit, since
  their few parameters buy little memory and quantising them costs accuracy on every image;
- gradient checkpointing covers the vision tower's layers as well as the language model's;
- sftop's kernels go on the language layers where the family's text layers are a patch-registry
  family, and everything stays stock otherwise, with the reason in the kernels report.
"""

from __future__ import annotations

import re
from typing import Any

from sftop.engine.errors import ModelError
from sftop.engine.models.vision.family import VisionFamily

# The kernel parts a VLM gets: those that act on single language layers by their class, and the
# overlapped offload of the checkpointed layers' inputs (the tower's blocks and the language
# layers, each stack its own chain), which the VLM graph parts can capture where transformers' own
# offload cannot.  The loss, lean-recompute and text CUDA-graph parts assume the model is the causal
# LM itself, which a VLM is not.
VLM_KERNEL_PARTS = ("rms_norm", "rope", "mlp", "lora", "attention_lora", "attention", "checkpoint_offload")


def vlm_kernel_parts(model) -> tuple[str, ...]:
    """VLM_KERNEL_PARTS, and the fused loss where a kernel family file describes this VLM itself
    (sftop/kernels/patching/families/): its loss part knows the model's own forward.  With
    SFTOP_CHUNKED_MLP=1 such a VLM's layers also get lean recomputation, which hands their MLPs the
    layer run the chunked MLP needs (docs/kernels.md; off by default: on a GPU it saved little at a
    cost in speed)."""
    from sftop.kernels.constants import CHUNKED_MLP_ENV
    from sftop.kernels.env import env_flag
    from sftop.kernels.patching.registry import MULTIMODAL

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = getattr(getattr(base, "config", None), "model_type", None)
    if own not in MULTIMODAL:
        return VLM_KERNEL_PARTS
    lean = ("lean_recompute",) if env_flag(CHUNKED_MLP_ENV, default=False) else ()
    return VLM_KERNEL_PARTS + ("loss",) + lean


def model_config(model_section) -> Any:
    """The transformers config of `model_section` (config.json only, no weights)."""
    from transformers import AutoConfig

    from sftop.engine.models.tokenizer import hub_call

    def load(source, local_files_only):
        return AutoConfig.from_pretrained(
            source,
            revision=model_section.revision,
            trust_remote_code=model_section.trust_remote_code,
            local_files_only=local_files_only,
        )

    return hub_call(model_section, "model config", load)


def family_of(config: Any) -> VisionFamily | None:
    """The VLM family of a config object, or of a config.json's dict (published shapes)."""
    from collections.abc import Mapping

    from sftop.engine.models.vision.registry import family_for_config, family_for_model_type

    if isinstance(config, Mapping):
        return family_for_model_type(str(config.get("model_type", "")))
    return family_for_config(config)


def vision_family(model_section) -> VisionFamily | None:
    """The VLM family of `model_section`'s model, or None for a text-only model."""
    from sftop.engine.models.demo import DEMO_NAME

    if model_section.name == DEMO_NAME:
        return None
    return family_of(model_config(model_section))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def vision_module_names(model, family: VisionFamily) -> list[str]:
    """The largest submodules whose every linear layer is in the vision tower or the projector.

    These names go to bitsandbytes (`llm_int8_skip_modules`), which leaves whole subtrees
    unquantised by prefix. Read from the model's structure (a meta-device instance is enough).
    """
    from torch import nn

    patterns = [family.lora_targets.vision, family.lora_targets.projector]
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    visual = {n for n in linears if _matches(n, patterns)}
    if not visual:
        return []
    chosen: list[str] = []
    for name, _module in model.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in chosen):
            continue
        under = [n for n in linears if n == name or n.startswith(name + ".")]
        if under and all(n in visual for n in under):
            chosen.append(name)
    return chosen


def _meta_model(family: VisionFamily, config: Any):
    """The model's structure without memory: for reading module names before loading."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return family.model_class().from_config(config)


def quantization_skip_modules(family: VisionFamily, config: Any) -> list[str]:
    """What 4-bit loading must leave in 16-bit: the vision tower, the projector and the LM head."""
    model = _meta_model(family, config)
    names = vision_module_names(model, family)
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head and name:
            names.append(name)
    return names


def load_processor(model_section, family: VisionFamily):
    """The model's processor (tokenizer, chat template, image processor), with a pad token."""

    from sftop.engine.models.demo_vlm import DEMO_VLM_NAME
    from sftop.engine.models.tokenizer import ensure_pad_token, hub_call

    if model_section.name == DEMO_VLM_NAME:
        # Built locally like the demo's weights: the same processor whether or not this install
        # has the optional video processors that loading a saved Qwen processor asks for.
        processor = family.offline_processor()
        ensure_pad_token(processor.tokenizer)
        return processor

    def load(source, local_files_only):
        # the family's loader: AutoProcessor, or without torchvision the processor built from the
        # checkpoint's own parts (a saved Qwen-VL processor asks for a video processor otherwise)
        return family.load_processor(
            source,
            revision=model_section.revision,
            trust_remote_code=model_section.trust_remote_code,
            local_files_only=local_files_only,
        )

    processor = hub_call(model_section, "processor", load)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ModelError(
            f"The processor of `{model_section.name}` has no tokenizer",
            where="model.name",
            hint=f"Use a {family.display_name} checkpoint that ships its processor (processor_config.json, tokenizer files)",
        )
    ensure_pad_token(tokenizer)
    return processor


def load_vision_base(model_section, family: VisionFamily, *, dtype: str, attn: str, config: Any = None):
    """The base VLM alone (no LoRA): for training and for merged export."""
    from sftop.engine.models.loading import from_pretrained_kwargs
    from sftop.engine.models.tokenizer import hub_call

    skip = (
        quantization_skip_modules(family, config or model_config(model_section)) if model_section.load_in_4bit else None
    )
    kwargs = from_pretrained_kwargs(model_section, dtype, attn, skip_4bit=skip)
    model_class = family.model_class()

    def load(source, local_files_only):
        return model_class.from_pretrained(source, local_files_only=local_files_only, **kwargs)

    return hub_call(model_section, "model", load)


def lora_config(lora_section, family: VisionFamily, model):
    """LoRA by part: `lora.parts` (or the family's default) as the model's matching linear layers."""
    from peft import LoraConfig

    from sftop.engine.models.vision.lora_parts import target_module_names

    return LoraConfig(
        r=lora_section.r,
        lora_alpha=lora_section.alpha,
        lora_dropout=lora_section.dropout,
        target_modules=target_module_names(model, family, lora_section.parts),
        task_type="CAUSAL_LM",
        bias="none",
    )


def vision_checkpointed(model, family: VisionFamily) -> bool:
    """Whether gradient checkpointing reaches the vision tower: its layers carry the flag and it is on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = [n for n in vision_module_names(base, family)]
    layers = [
        m
        for n, m in base.named_modules()
        if isinstance(m, GradientCheckpointingLayer) and any(n.startswith(v + ".") for v in vision)
    ]
    return bool(layers) and all(getattr(m, "gradient_checkpointing", False) for m in layers)


def vision_supports_checkpointing(model, family: VisionFamily) -> bool:
    """HF's flag on the vision tower's own PreTrainedModel (where it has one), else on the whole model."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in vision_module_names(base, family):
        module = base.get_submodule(name)
        if isinstance(module, PreTrainedModel):
            return bool(module.supports_gradient_checkpointing)
    return bool(getattr(base, "supports_gradient_checkpointing", False))


def apply_vision_kernels(model, family: VisionFamily, mode: str) -> dict[str, Any]:
    """sftop's kernels on the language layers where the registry knows them; stock otherwise, and why."""
    from sftop.engine.models.loading import cuda_available

    text_type = family.language_model_type
    if mode == "off":
        return {"enabled": False, "reason": "train.kernels = off"}
    if text_type is None:
        reason = f"{family.display_name}'s language layers are not ones sftop's kernels cover: stock PyTorch layers"
        if mode == "on":
            raise ModelError(
                f"train.kernels = on, but {reason}",
                where="train.kernels",
                hint='Set train.kernels = "auto" to train on the stock layers',
            )
        return {"enabled": False, "reason": reason, "language_model_type": None}
    if mode == "auto" and not cuda_available():
        return {"enabled": False, "reason": "no CUDA GPU: stock PyTorch layers", "language_model_type": text_type}
    try:
        from sftop.kernels import patch_model

        report = patch_model(model, model_type=text_type, only=vlm_kernel_parts(model))
        data = report.to_dict()
        vision = _vision_tower_kernels(model)
        tower = "vision tower patched" if "fused" in vision.values() else "vision tower stock"
        return {
            "enabled": report.any_fused or "fused" in vision.values(),
            "language_model_type": text_type,
            "reason": f"language layers ({text_type}) patched; {tower}; projector stock",
            **data,
            "vision_parts": vision,
        }
    except Exception as exc:  # noqa: BLE001 - kernels are an optimisation, never a reason to fail
        if mode == "on":
            raise ModelError(
                f"train.kernels = on, but sftop's kernels could not be applied ({type(exc).__name__}: {exc})",
                where="train.kernels",
                hint='Set train.kernels = "auto" to fall back to the stock layers',
            ) from None
        return {
            "enabled": False,
            "reason": f"kernels unavailable: {type(exc).__name__}: {exc}",
            "language_model_type": text_type,
        }


def _vision_tower_kernels(model) -> dict[str, str]:
    """The tower's own parts (sftop/kernels/patching/towers.py: Qwen-VL's or SigLIP's tower):
    "fused" or "stock: why" each."""
    from sftop.kernels.patching.towers import patch_towers
    from sftop.kernels.patching.vision_tower import VISION_PARTS

    try:
        return patch_towers(model)
    except Exception as exc:  # noqa: BLE001 - as for the language layers: stock, with the reason
        return {p: f"stock: patch failed ({type(exc).__name__}: {exc})" for p in VISION_PARTS}


def load_vision_model(preset, family: VisionFamily):
    """Return `(model, processor, info)`: the LoRA-wrapped VLM ready for SFTTrainer."""
    from peft import get_peft_model
    from transformers import set_seed

    from sftop.engine.models.loading import ModelInfo, count_params, resolve_attn_implementation, resolve_dtype

    section = preset.model
    dtype = resolve_dtype(section.dtype)
    attn = resolve_attn_implementation(section.attn_implementation, dtype)
    processor = load_processor(section, family)
    base = load_vision_base(section, family, dtype=dtype, attn=attn)
    set_seed(preset.train.seed)  # LoRA's A matrices come from the global RNG: repeatable runs and resumes
    try:
        if getattr(section, "adapter", None):  # DPO after SFT: continue an earlier run's adapter
            from sftop.engine.models.loading import load_start_adapter

            model = load_start_adapter(base, section.adapter)
        else:
            model = get_peft_model(base, lora_config(preset.lora, family, base))
    except ValueError as exc:
        raise ModelError(
            f"Cannot add LoRA to this {family.display_name} model: {exc}",
            where="lora.parts",
            hint='Choose parts the model has, e.g. lora.parts = ["language", "attention", "mlp"]',
        ) from None
    kernels = apply_vision_kernels(model, family, preset.train.kernels)
    from sftop.engine.models.vision import frozen_tower

    # not a kernel: the same arithmetic with the frozen tower's backward left out, on every path
    kernels["frozen_tower"] = frozen_tower.install(model)
    total, trainable = count_params(model)
    info = ModelInfo(
        source=section.name,
        device=str(next(base.parameters()).device),
        dtype=dtype,
        attn_implementation=attn,
        load_in_4bit=section.load_in_4bit,
        params_total=total,
        params_trainable=trainable,
        kernels=kernels,
        vision_family=family.name,
    )
    return model, processor, info
