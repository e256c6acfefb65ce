"""Translate a resolved preset + plan into TRL's `SFTConfig`."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def optimizer_name(choice: str, on_cuda: bool) -> tuple[str, str | None]:
    """(TrainingArguments.optim, note). adamw_8bit without a GPU falls back to plain AdamW."""
    if choice == "adamw_8bit":
        if on_cuda:
            return "adamw_bnb_8bit", None
        return "adamw_torch", "train.optimizer = adamw_8bit needs a CUDA GPU: using adamw (fp32 states) on CPU"
    # Fused AdamW updates all LoRA parameters in a few multi-tensor kernels instead of a dozen
    # per parameter; torch builds without a fused kernel for the device fall back to foreach.
    return ("adamw_torch_fused" if fused_adamw_available("cuda" if on_cuda else "cpu") else "adamw_torch"), None


def dataloader_settings(on_cuda: bool) -> dict:
    """TrainingArguments for the data loader: on a GPU, one worker process collates the next
    micro-batches while the GPU trains (into pinned memory, copied to the GPU without waiting),
    instead of the training loop collating each one between steps. On the CPU, collation stays in
    the training process, whose cores do the training."""
    if not on_cuda:
        return {"dataloader_num_workers": 0}
    return {
        "dataloader_num_workers": 1,
        "dataloader_prefetch_factor": 4,
        "dataloader_persistent_workers": True,
        "dataloader_pin_memory": True,
        # the copy of each batch to the GPU is queued instead of waited for: a blocking copy makes the
        # host wait until the GPU has finished everything queued before it (a sync per tensor)
        "accelerator_config": {"non_blocking": True},
    }


@functools.lru_cache(maxsize=None)
def fused_adamw_available(device: str) -> bool:
    """Whether this torch has a fused AdamW kernel for `device` ("cuda" or "cpu")."""
    if device == "cuda" and not torch.cuda.is_available():
        return False
    try:
        p = torch.zeros(2, device=device, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _ddp_timeout_s() -> int:
    from sftop.engine.launch import ddp_timeout_s

    return ddp_timeout_s()


def build_sft_config(
    preset,
    plan,
    *,
    output_dir: Path,
    dtype: str,
    packing: bool,
    has_eval: bool,
    on_cuda: bool | None = None,
    vision: bool = False,
):
    from trl import SFTConfig

    from sftop.engine.train.checkpointing_api import checkpointing_args

    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    train = preset.train
    optim, _ = optimizer_name(train.optimizer, on_cuda)
    checkpointing = str(plan.gradient_checkpointing)
    # Held-out rows with no eval_steps: evaluate whenever a checkpoint is saved.
    eval_steps = (train.eval_steps or train.save_steps) if has_eval else None
    warmup = train.warmup_ratio if train.warmup_ratio < 1.0 else 0.999  # >= 1 would mean "steps"
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=int(plan.micro_batch),
        per_device_eval_batch_size=int(plan.micro_batch),
        gradient_accumulation_steps=int(plan.grad_accum),
        max_steps=train.max_steps if train.max_steps else -1,
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=optim,
        seed=train.seed,
        data_seed=train.seed,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        # "offload" keeps the checkpointed activations in pinned host memory: Trainer calls
        # activation_checkpointing_enable(offload=True), which sftop's patch part checkpoint_offload
        # turns into copies that overlap the compute.  The planner's estimate assumes two layer
        # inputs on the GPU (the one recomputing and the one fetched ahead).
        # every_n_layers: the planner may checkpoint only every n-th block when memory allows.
        **checkpointing_args(
            SFTConfig,
            checkpointing in ("on", "offload"),
            {
                "use_reentrant": False,
                "offload": checkpointing == "offload",
                "every_n_layers": int(getattr(plan, "checkpoint_every_n_layers", 1) or 1),
            }
            if checkpointing != "off"
            else None,
        ),
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a host sync per micro-batch; SftopTrainer.training_step handles NaN/inf
        disable_tqdm=True,  # progress bars turn stdout.log into carriage-return soup
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,  # SftopTrainer rotates its atomic checkpoints itself
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        report_to="none",
        push_to_hub=False,
        hub_token=None,
        include_num_input_tokens_seen="no",  # counted by sftop (non-padding tokens)
        **dataloader_settings(on_cuda),
        use_cpu=not on_cuda,
        # several processes (sftop.engine.launch): a rank that hangs fails the run after this long
        # instead of holding every GPU; every LoRA parameter is used in each forward, so DDP need
        # not search the graph for unused ones each step
        ddp_timeout=_ddp_timeout_s(),
        ddp_find_unused_parameters=False,
        # several machines: every node writes whole checkpoints into its own run directory, so each
        # can resume from its own disk (on one machine this is rank 0, as without it)
        save_on_each_node=True,
        # sftop.engine.data already dropped rows longer than data.max_length (it never truncates).
        # "Packing" here is padding-free batching: each micro-batch concatenates exactly micro_batch
        # rows into one row with restarting position_ids, so train.effective_batch stays "rows per
        # optimizer step". TRL's own packing (bfd) would instead fill max_length-token bins and put
        # several times more rows into every step than the preset says.
        # A VLM's rows were measured with their image tokens and dropped when too long; its batches
        # come from sftop's collator over row indices, so TRL neither prepares nor trims them.
        max_length=None if (packing or vision) else preset.data.max_length,
        **({"dataset_kwargs": {"skip_prepare_dataset": True}, "remove_unused_columns": False} if vision else {}),
        packing=False,
        padding_free=packing and not vision,  # a VLM's own collator packs (train/vision_packing.py)
        pad_to_multiple_of=None,
        loss_type="nll",
        completion_only_loss=None,
        assistant_only_loss=False,  # labels come pre-masked from sftop.engine.data
        shuffle_dataset=False,
        dataset_num_proc=None,
    )
