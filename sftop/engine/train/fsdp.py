"""FSDP2 runs: the weights sharded over the processes, through accelerate's FSDP plugin (version 2).

The supervisor writes the plugin's settings into the run's `accelerate.yaml` (`fsdp_section`), so
`launch.sh` repeats the run by hand; `accelerate launch` turns them into each rank's environment
(ACCELERATE_USE_FSDP, FSDP_VERSION=2, ...) and the Trainer's Accelerator builds the plugin from it.
What sftop adds around accelerate:

- every decoder layer is its own FSDP unit (the model's `_no_split_modules`), the embeddings and
  the final norm with the LM head are units of their own, the rest is the root unit;
- LoRA: only the adapter's parameters train; the frozen base is sharded with them (FSDP2 shards
  per parameter, so frozen and trainable weights share a unit without use_orig_params' trade-offs);
  with bf16 the adapter keeps fp32 master weights and FSDP2 casts to bf16 for compute;
- QLoRA: the 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`), so FSDP2
  can shard the packed weights like any bf16 tensor;
- saves gather only the adapter (a full state dict on rank 0): the adapter directory and a
  checkpoint's files are world-size free, so a resume works on any number of processes;
- CPU ranks (gloo): accelerate turns FSDP on only for accelerator devices; `enable_on_cpu` turns
  the same plugin on after accelerate set up gloo, so the CPU tests run the FSDP2 code path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# Why sftop parts are off under FSDP2 (run_started.environment.distributed says so).
OFF_REASONS = {
    "cuda_graphs": "off: FSDP2 all-gathers each layer's weights and reduce-scatters its gradients in hooks around "
    "the layer, which a replayed CUDA graph would skip",
    "kernels": "off: sftop's fused kernels read weights that FSDP2 keeps sharded outside their layer's forward "
    "(the LM head in the fused loss, the LoRA MLP's weights); the stock layers run under FSDP2",
    "checkpoint_offload": "off: offloaded gradient checkpointing is untested with FSDP2's re-gather in backward; "
    "activations are recomputed on the GPU instead (gradient_checkpointing on)",
}


def fsdp2_active(env: Mapping[str, str] | None = None) -> bool:
    """Is this process a rank of an FSDP2 run (started from an accelerate config with fsdp_version 2)?"""
    environ = os.environ if env is None else env
    return environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and environ.get("FSDP_VERSION", "1") == "2"


def layer_classes(model_config: Any) -> list[str]:
    """The decoder layer classes FSDP2 wraps one unit each: the model class's `_no_split_modules`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(model_config, Mapping):  # the planner's plain-dict configs
        try:
            config_class = CONFIG_MAPPING[str(model_config.get("model_type"))]
        except KeyError:
            return []
    else:
        config_class = type(model_config)
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            cls = auto._model_mapping[config_class]
        except (KeyError, ValueError):
            continue
        return list(getattr(cls, "_no_split_modules", None) or [])
    return []


def fsdp_section(model_config: Any, load_in_4bit: bool) -> dict[str, Any]:
    """accelerate's `fsdp_config` for an FSDP2 run of this model."""
    classes = layer_classes(model_config)
    return {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        **({"fsdp_transformer_layer_cls_to_wrap": ",".join(classes)} if classes else {}),
        "fsdp_reshard_after_forward": True,
        # whole (gathered) state dicts: checkpoints and the adapter do not depend on the process count
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_offload_params": False,
        # rank 0 reads the weights, the others receive their shards (a 4-bit model is quantized on
        # each GPU before it is sharded: accelerate skips this for bitsandbytes weights)
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_sync_module_states": True,
        "fsdp_activation_checkpointing": False,  # the Trainer's gradient checkpointing (the plan's) applies
    }


# Where an FSDP-QLoRA rank quantizes its 4-bit weights: "gpu" (each GPU holds them all while loading,
# then keeps its shard: transformers' path) or "cpu" (bitsandbytes quantizes in host memory and
# FSDP2 moves each rank's shard to its GPU: a model whose 4-bit weights exceed one GPU). Chosen per
# run by `choose_4bit_load`; SFTOP_FSDP2_LOAD_4BIT=cpu|gpu overrides it.
LOAD_4BIT_ENV = "SFTOP_FSDP2_LOAD_4BIT"
_load_4bit = {"where": "gpu"}


def choose_4bit_load(weights_gib: float, budget_gib: float) -> str:
    """Quantize on the GPU when all 4-bit weights fit it with the plan's budget to spare, else on the CPU."""
    forced = os.environ.get(LOAD_4BIT_ENV, "").strip().lower()
    where = forced if forced in ("cpu", "gpu") else ("gpu" if weights_gib <= 0.8 * budget_gib else "cpu")
    _load_4bit["where"] = where
    return where


def load_4bit_on_cpu() -> bool:
    return fsdp2_active() and _load_4bit["where"] == "cpu"


def cpu_4bit_allowed() -> bool:
    """4-bit weights without a GPU: only in the CPU twin of FSDP-QLoRA (CPU ranks of an FSDP2 run),
    which bitsandbytes quantizes and multiplies on the CPU; a one-process CPU run stays refused."""
    return fsdp2_active() and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"


def keep_4bit_layout(model: Any) -> None:
    """FSDP2 on CPU ranks: bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the
    first no-grad forward (the sample answers); under FSDP2 that weight is the gathered copy of the
    shards, whose layout must stay as sharded. Keep the training layout."""
    if not cpu_4bit_allowed():
        return
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def start_group() -> None:
    """Join the process group before the model loads: transformers then loads the weights on rank 0
    only (the others receive their shards when FSDP2 wraps the model). The same group, with the
    same timeout, that the Trainer's accelerator would start."""
    from datetime import timedelta

    from accelerate import PartialState

    from sftop.engine.launch import ddp_timeout_s

    PartialState(
        cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true", timeout=timedelta(seconds=ddp_timeout_s())
    )


def enable_on_cpu(trainer: Any) -> None:
    """CPU ranks: put accelerate's state in FSDP mode with the plugin from the environment.

    accelerate 1.x decides FSDP only for accelerator devices (MULTI_CPU never becomes FSDP), but
    its FSDP2 path (fully_shard, the state dicts) runs on the CPU with gloo. Called right after the
    Trainer built its Accelerator, before anything was prepared."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = trainer.accelerator
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def adapter_state_dict(model: Any) -> dict[str, Any]:
    """The trainable (adapter) parameters as whole CPU tensors on every rank (a collective: every rank
    calls it). Every rank gets them, so each node's first process can write them (save_on_each_node);
    an adapter is small next to the sharded base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False, ignore_frozen_params=True)
    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=options).items()}


def local_grad_square_sum(grads: list[Any]) -> Any:
    """Sum of squares of this rank's shards of `grads` (plain tensors or DTensors), as a float32 tensor."""
    import torch

    total = None
    for g in grads:
        local = g.to_local() if hasattr(g, "to_local") else g
        part = local.detach().float().pow(2).sum()
        total = part if total is None else total + part.to(total.device)
    return total if total is not None else torch.zeros(())


def sharded_grads(grads: list[Any]) -> bool:
    return any(hasattr(g, "to_local") for g in grads)


def distributed_notes() -> dict[str, str]:
    """run_started.environment.distributed's lines for an FSDP2 run."""
    return {
        "cuda_graphs": OFF_REASONS["cuda_graphs"],
        "kernels": OFF_REASONS["kernels"],
        "checkpoint_offload": OFF_REASONS["checkpoint_offload"],
        "sharding": "FSDP2: one unit per decoder layer, the embeddings, and the final norm with the LM head; "
        "only the adapter trains (fp32 master weights under bf16), the frozen base is sharded with it",
        "checkpoints": "whole (gathered) adapter and optimizer state on rank 0: resumable on any number of "
        "processes (2 or more) under FSDP2",
    }


def sharded_parameters(model: Any) -> dict[str, int]:
    """How many of the model's parameters FSDP2 holds as shards (DTensors), trainable and frozen."""
    counts = {"sharded": 0, "total": 0, "trainable_sharded": 0}
    for p in model.parameters():
        counts["total"] += 1
        if hasattr(p, "to_local"):
            counts["sharded"] += 1
            counts["trainable_sharded"] += int(p.requires_grad)
    return counts


def refuse_single_process_resume(checkpoint: Any, world_size: int) -> None:
    """An FSDP2 checkpoint holds accelerate's FSDP files, which only an FSDP2 run reads back."""
    from sftop.engine.errors import PresetError
    from sftop.engine.train.trainer import is_fsdp_checkpoint

    if world_size == 1 and checkpoint is not None and is_fsdp_checkpoint(checkpoint):
        raise PresetError(
            f"Checkpoint {checkpoint.name} was written by an FSDP2 run, which only a run over several processes "
            "under FSDP2 resumes",
            where="plan.gpus",
            hint="Resume with plan.gpus = 2 or more (`sftop resume RUN --set plan.gpus=2`); any number of 2 or more works",
        )
