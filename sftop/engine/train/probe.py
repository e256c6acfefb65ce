"""One throwaway optimizer step at the plan's largest batch shape, to measure real GPU memory.

The planner decides from the measurement (`sftop.engine.planner.run_probe`); this module only
runs the step. It must leave no trace on training: the optimizer is a separate instance with
lr = 0 (so Adam's states get allocated, as they would be, but no weight moves), the RNG state is
restored, and the trainer's running metrics are cleared.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from sftop.kernels import compat


def _probe_features(
    rows: int, tokens_per_row: int, max_length: int, padding_free: bool, vocab: int, generator: torch.Generator
) -> list[dict]:
    if padding_free:
        # One concatenated row of rows x max_length documents: the worst micro-batch the plan allows.
        total = rows * tokens_per_row
        lengths = [max_length] * (total // max_length) + ([total % max_length] if total % max_length else [])
    else:
        lengths = [tokens_per_row] * rows
    features = []
    for n in lengths:
        ids = torch.randint(4, max(5, vocab - 1), (n,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": ids})  # every token trained: the loss head's worst case
    return features


def probe_step(trainer, rows: int, tokens_per_row: int, max_length: int) -> None:
    """Forward, backward and an optimizer step on a synthetic batch; weights and optimizer untouched."""
    model = trainer.model
    args = trainer.args
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.gradient_checkpointing:  # Trainer only turns it on inside train(); the probe must see it too
        kwargs = dict(args.gradient_checkpointing_kwargs or {})
        offload = kwargs.pop("offload", False)
        every = kwargs.pop("every_n_layers", 1)
        from sftop.engine.train.checkpointing_api import enable_checkpointing

        enable_checkpointing(model, kwargs or None, every_n_layers=every, offload=offload)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(trainable, **{**optimizer_kwargs, "lr": 0.0})
    padding_free = bool(getattr(trainer.data_collator, "padding_free", False))
    vocab = model.get_input_embeddings().num_embeddings
    features = _probe_features(rows, tokens_per_row, max_length, padding_free, vocab, torch.Generator().manual_seed(0))
    try:
        model.train()
        inputs = compat.trainer_prepare_inputs(trainer, trainer.data_collator(features))
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, inputs
    finally:
        for p in trainable:
            p.grad = None
        optimizer.state.clear()
        del optimizer
        # The probe's batch is not training data: keep it out of the logged metrics and token counts.
        compat.reset_trainer_counters(trainer)
        if hasattr(trainer, "sftop_metrics"):  # DPO's metrics kept on the device until the next log
            trainer.sftop_metrics.pending.clear()
        trainer.sftop_step_tokens = 0
        trainer.sftop_step_samples = 0
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
