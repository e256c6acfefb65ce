"""Preference tuning (`train.task = "dpo"`): TRL's DPOTrainer with sftop's checkpoints, guard and kernels.

The loop, the losses (`dpo.loss_type`), the reward metrics and the reference handling are TRL's.
sftop adds what `SftopTrainer` adds for SFT (atomic checkpoints, NaN/inf update skipping, token
counts) and its kernels:

- The policy is the LoRA model sftop loaded (kernels patched in).  The reference is the same model
  with the adapter disabled (`dpo.reference = "adapter-off"`): no second copy of the weights.  A run
  that starts from an earlier adapter (`model.adapter`) is compared against that adapter as it was
  at the start (TRL keeps a frozen copy named "ref", adapter-sized), which is what DPO after SFT
  means.  `dpo.reference = PATH` loads a separate reference model.
- Chosen and rejected run in one forward (TRL concatenates them); the per-token log-probabilities
  come from sftop's fused linear log-prob kernel (`sftop.kernels.patching.logprob_head`), never
  materialising [tokens, vocab] logits, for the policy and the reference forward alike.
- The dataset comes pre-tokenised (`sftop.engine.data.preference_prepare`): pairs over
  `data.max_length` were dropped there, so TRL's collator never truncates.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer

from sftop.engine.train import adapter_switch
from sftop.engine.train.dpo_batch_check import BatchCheckingCollator, take_batch_check, take_shared_prompt
from sftop.engine.train.dpo_step import DeferredMetrics, sigmoid_dpo_loss, takes_fast_path
from sftop.engine.train.train_mode import train_call_skipped
from sftop.engine.train.trainer import SftopTrainer
from sftop.engine.train.update_guard import UpdateGuard
from sftop.engine.train.zero_grad import OptimizerZeroGrad
from sftop.kernels.logprob_graphs import labels_from_one_batch
from sftop.kernels.shared_prompt import shared_prompt_scope
from sftop.kernels.patching import checkpointing


def build_dpo_config(
    preset, plan, *, output_dir: Path, dtype: str, has_eval: bool, on_cuda: bool | None = None, vision: bool = False
):
    """The SFT run's TrainingArguments (same optimizer, schedule, checkpointing, logging) + the DPO keys.

    `vision`: the dataset holds pair indices for sftop's vision collator, so no column is removed."""
    from sftop.engine.train.config import build_sft_config

    sft = build_sft_config(
        preset,
        plan,
        output_dir=output_dir,
        dtype=dtype,
        packing=False,
        has_eval=has_eval,
        on_cuda=on_cuda,
        vision=vision,
    )
    common = {f.name: getattr(sft, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    dpo = preset.dpo
    return DPOConfig(
        **common,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        # pairs longer than data.max_length were dropped, never truncated (preference_prepare)
        max_length=None,
        # TRL 1.16 has padding-free batching switched off for DPO: pad each micro-batch
        padding_free=False,
        pad_to_multiple_of=None,
        precompute_ref_log_probs=False,
        dataset_num_proc=None,
    )


class SftopDPOTrainer(DPOTrainer):
    # The same atomic checkpoints and rotation as SFT runs (they call Trainer._save_checkpoint
    # directly, so TRL's per-checkpoint model card is skipped here too).
    _save_checkpoint = SftopTrainer._save_checkpoint
    _rotate_sftop_checkpoints = SftopTrainer._rotate_sftop_checkpoints
    _checkpoint_bytes = SftopTrainer._checkpoint_bytes
    take_step_counts = SftopTrainer.take_step_counts
    floating_point_ops = SftopTrainer.floating_point_ops
    data_collator: Any  # TRL's collator, wrapped in __init__ (dpo_batch_check.BatchCheckingCollator)

    def __init__(
        self,
        *args,
        guard: UpdateGuard,
        save_total_limit: int,
        on_checkpoint: Callable[[Path], None] | None = None,
        kernel_head: bool = False,
        kernel_parts: dict | None = None,
        keep_ref_adapter: bool = False,
        reference_adapter: Path | None = None,
        share_prompt: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if reference_adapter is not None:  # dpo.reference names an adapter: it replaces TRL's copy
            load_reference_adapter(self.model, reference_adapter)
            keep_ref_adapter = True
        self.sftop_guard = guard
        self.sftop_save_total_limit = save_total_limit
        self.sftop_on_checkpoint = on_checkpoint
        self.sftop_metrics = DeferredMetrics()
        self.sftop_step_tokens = 0
        self.sftop_step_samples = 0
        self.sftop_flos_per_token: int | None = None
        # the reference forward's adapter switch without PEFT's per-call status report (adapter_switch.py)
        adapter_switch.install(self.model)
        peft_config = getattr(self.model, "peft_config", {})
        if "ref" in peft_config and not keep_ref_adapter:
            # TRL copies the adapter of any PeftModel it is given into a frozen "ref" adapter; for a
            # fresh adapter that copy is the base model, which disabling the adapter gives for free.
            self.model.delete_adapter("ref")
        self.sftop_save_kwargs = {"selected_adapters": ["default"]} if "ref" in peft_config else {}
        self.sftop_reference = (
            f"adapter {reference_adapter}"
            if reference_adapter is not None
            else (
                "ref adapter"
                if "ref" in peft_config
                else ("separate model" if self.ref_model is not None else "adapter off")
            )
        )
        self.sftop_head = "stock: train.kernels off or not available"
        self.sftop_graphs = "off: no fused log-prob head"
        # TRL switches checkpointing off for every reference forward and back on with the arguments'
        # whole dict, offload and layer spacing inside: the wrapper reads them there, kernels or not
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        checkpointing.install(policy)
        self._sftop_policy = policy
        self.sftop_shared_prompt = "off: dpo.share_prompt = false"
        if kernel_head:
            from sftop.kernels.logprob_graphs import graphs_status
            from sftop.kernels.patching.logprob_head import install_logprob_head

            self.sftop_head = install_logprob_head(policy)
            if self.sftop_head == "fused":
                self.sftop_graphs = graphs_status(policy, kernel_parts)
            if self.ref_model is not None:
                install_logprob_head(self.ref_model)
        if share_prompt:
            self.sftop_shared_prompt = _shared_prompt_status(policy, self.sftop_head, vision="row" in _columns(kwargs))
        # the graphs' batch check (and the shared-prompt layout) worked out on the host as each batch is collated
        self.data_collator = BatchCheckingCollator(self.data_collator, share_prompt=self.sftop_shared_prompt == "on")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # sftop's data pipeline already tokenised the pairs (and applied the length policy); a vision
        # run's dataset holds pair indices that sftop's collator turns into batches
        columns = set(getattr(dataset, "column_names", None) or [])
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns or columns == {"row"}:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        # The reference forward first, then TRL's step with its log-probs handed in as precomputed
        # (the same values: TRL's own reference computation, its adapter switch and no_grad).  TRL
        # runs it between the policy's forward and backward, on top of the policy's saved
        # activations; before it, its transients are gone when the policy's forward starts, which
        # lowers the eager peak and lets the CUDA graphs of both forwards share one memory pool
        # (sftop/kernels/cuda_graphs.py).
        inputs, checked = take_batch_check(inputs)
        inputs, layout = take_shared_prompt(inputs)
        if self.precompute_ref_logps:
            return super()._compute_loss(model, inputs, return_outputs)
        if layout is not None:
            layout = layout.to(inputs["input_ids"].device, non_blocking=True)
        # both forwards build their labels from this batch the same way: the graphs take its batch
        # check from the collator, worked out on the host (or read it once where the batch came
        # without it), and the host never waits for the GPU to choose a captured step
        # (sftop/kernels/logprob_graphs.py); with dpo.share_prompt both run each prompt once
        # (sftop/kernels/shared_prompt.py)
        with contextlib.ExitStack() as scopes:
            scopes.enter_context(labels_from_one_batch(self._sftop_policy, checked))
            for lm in (self._sftop_policy, self.ref_model):
                if lm is not None:
                    scopes.enter_context(shared_prompt_scope(lm, layout))
            return self._reference_then_policy(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        # TRL's own callers too (its dataset-wide precomputation) hand the model every batch key
        return super().compute_ref_log_probs(model, take_shared_prompt(take_batch_check(inputs)[0])[0])

    def _reference_then_policy(self, model, inputs, return_outputs):
        reference = self.ref_model if self.ref_model is not None else self.model
        ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
        if takes_fast_path(self, return_outputs):
            # the DPO loss with its metrics kept on the device until the trainer logs (dpo_step.py)
            loss, metrics = sigmoid_dpo_loss(self, model, inputs, ref_chosen, ref_rejected)
            self.sftop_metrics.add(metrics)
            return loss
        inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        self.precompute_ref_logps = True
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = False

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.sftop_metrics.flush(self)  # the one read of the micro-batches' metrics since the last log
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the batch is [chosen rows; rejected rows]: tokens of both forwards, samples = pairs
        self.sftop_step_tokens += inputs["attention_mask"].sum()
        self.sftop_step_samples += inputs["attention_mask"].shape[0] // 2
        with train_call_skipped(model):  # transformers' per-step model.train() walks every module
            loss = super().training_step(model, inputs, num_items_in_batch)
        # kept on the device and read with the gradient norm, once per optimizer step (UpdateGuard),
        # as SftopTrainer does: a read here would stall the host after every micro-batch's backward
        self.sftop_guard.note_loss(loss)
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))


def _columns(trainer_kwargs: dict) -> set:
    return set(getattr(trainer_kwargs.get("train_dataset"), "column_names", None) or [])


def _shared_prompt_status(policy, head: str, vision: bool) -> str:
    """ "on", or "off: why" for dpo.share_prompt."""
    from sftop.kernels import compat
    from sftop.kernels.varlen_attention import NAME

    if vision:
        return "off: vision-language pairs (their images run through the tower per side)"
    if head != "fused":
        return f"off: needs sftop's fused log-prob head ({head})"
    config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
    if compat.attn_implementation(config) != NAME:
        return "off: needs sftop's packed attention (part attention), which reads the shared layout"
    return "on"


def reference_adapter(ref: str) -> Path | None:
    """The LoRA adapter `dpo.reference` names (an adapter directory, a run, `latest:PRESET`), or None
    when it names a model (a model directory or a hub id)."""
    from sftop.engine.models.adapters import LATEST, resolve_adapter
    from sftop.engine.rundir import list_run_dirs

    path = Path(ref).expanduser()
    if (path / "adapter_config.json").is_file():
        return path.resolve()
    if (path / "config.json").is_file():
        return None
    if ref.startswith(LATEST) or (path / "preset.toml").is_file() or any(r.name == ref for r in list_run_dirs()):
        return resolve_adapter(ref, key="dpo.reference")
    return None


def load_reference_model(preset):
    """The separate reference model of `dpo.reference = MODEL`, frozen, loaded as the policy's base is
    (dtype, 4-bit, the family's class for a vision-language model), with the same kernels."""
    from sftop.engine.models.loading import apply_kernels, load_base_model, resolve_attn_implementation, resolve_dtype
    from sftop.engine.models.vision.loading import apply_vision_kernels, load_vision_base, vision_family

    section = preset.model.model_copy(update={"name": preset.dpo.reference, "revision": None, "adapter": None})
    family = vision_family(section)
    if family is not None:
        dtype = resolve_dtype(section.dtype)
        model = load_vision_base(
            section, family, dtype=dtype, attn=resolve_attn_implementation(section.attn_implementation, dtype)
        )
    else:
        model, _, _ = load_base_model(section)
    model.requires_grad_(False)
    model.eval()
    if family is not None:
        apply_vision_kernels(model, family, preset.train.kernels)
    else:
        apply_kernels(model, preset.train.kernels)
    return model


def load_reference_adapter(model, path: Path) -> None:
    """`path`'s adapter into the policy under TRL's reference name "ref": frozen, dropout off.  TRL
    then runs the reference forward with that adapter active instead of the policy's."""
    from trl.trainer.utils import disable_dropout_in_model

    from sftop.engine.errors import ModelError

    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    try:
        model.load_adapter(str(path), adapter_name="ref", is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(
            f"The reference adapter {path} does not fit this model ({type(exc).__name__}: {str(exc)[:300]})",
            where="dpo.reference",
            hint="Give an adapter trained on model.name's base model, or a whole model directory",
        ) from None
    disable_dropout_in_model(model)


def build_dpo_trainer(run):
    """The DPO twin of `_Run.build_trainer` (sftop.engine.train.runner): same callbacks and guard."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    from sftop.engine.train.callbacks import RunEvents

    preset = run.preset
    vision = getattr(run, "vision", None) is not None
    args = build_dpo_config(
        preset,
        run.plan,
        output_dir=run.run_dir.checkpoints,
        dtype=run.info.dtype,
        has_eval=run.data.eval is not None,
        on_cuda=torch.cuda.is_available(),
        vision=vision,
    )
    ref_model = ref_adapter = None
    if preset.dpo.reference != "adapter-off":
        ref_adapter = reference_adapter(preset.dpo.reference)
        if ref_adapter is None:
            ref_model = getattr(run, "dpo_reference", None)  # loaded once, kept across OOM retries
            if ref_model is None:
                ref_model = run.dpo_reference = load_reference_model(preset)
    guard = UpdateGuard(preset.train.max_bad_steps)
    events = RunEvents(
        run.writer,
        started=run.started_event,
        stop_requested=run.stop_requested,
        checkpoint_request=run.run_dir.path / "control" / "checkpoint",
    )
    parts = (run.info.kernels.get("parts") or {}) if run.info.kernels.get("enabled") else {}
    # a VLM's loss part stays stock (it assumes a causal LM), but the log-prob head needs only the
    # language model's hidden states and its lm_head, which every family has
    fused_head = parts.get("loss") == "fused" or (vision and bool(parts))
    trainer = SftopDPOTrainer(
        model=run.model,
        ref_model=ref_model,
        args=args,
        train_dataset=run.data.train,
        eval_dataset=run.data.eval,
        processing_class=run.tokenizer,
        callbacks=[guard, events, OptimizerZeroGrad()],
        guard=guard,
        save_total_limit=preset.train.save_total_limit,
        on_checkpoint=run.on_checkpoint,
        kernel_head=fused_head,
        kernel_parts=parts,
        **({"data_collator": run.data.collator} if vision else {}),
        # starting from an earlier adapter: the reference is that adapter, frozen as it was
        keep_ref_adapter=bool(preset.model.adapter) and ref_model is None,
        reference_adapter=ref_adapter,
        share_prompt=preset.dpo.share_prompt,
    )
    trainer.remove_callback(PrinterCallback)
    run.info.kernels["logprob_head"] = trainer.sftop_head
    run.info.kernels["reference"] = trainer.sftop_reference
    run.info.kernels["dpo_graphs"] = trainer.sftop_graphs
    run.info.kernels["shared_prompt"] = trainer.sftop_shared_prompt
    events.trainer = trainer
    events.guard = guard
    run.events, run.guard, run.trainer = events, guard, trainer
    return trainer
