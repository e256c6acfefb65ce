"""TRL's SFTTrainer with three additions: atomic checkpoints, NaN/inf update skipping, token counting.

Everything else (the loop, packing, loss, optimizer, scheduler, resume) is TRL/transformers.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from sftop.engine.diskfull import DiskFullError, is_disk_full, tree_bytes
from sftop.engine.rundir import CHECKPOINT_PREFIX
from sftop.engine.train.distributed import ranks_max
from sftop.engine.train.manifest import verify_checkpoint, write_manifest
from sftop.engine.train.train_mode import train_call_skipped

# Files without which a checkpoint cannot be resumed (the adapter, optimizer, scheduler, position).
REQUIRED_CHECKPOINT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
)


def checkpoint_is_complete(path: Path) -> bool:
    return checkpoint_problem(path) is None


# An FSDP2 run's checkpoint: accelerate's whole (gathered) optimizer state, and the adapter again in
# the file accelerate's FSDP resume reads.
FSDP_CHECKPOINT_FILES = ("optimizer.bin", "pytorch_model_fsdp.bin")


def is_fsdp_checkpoint(path: Path) -> bool:
    return (path / FSDP_CHECKPOINT_FILES[1]).is_file()


def required_checkpoint_files(path: Path) -> tuple[str, ...]:
    if is_fsdp_checkpoint(path):
        return tuple(n for n in REQUIRED_CHECKPOINT_FILES if n != "optimizer.pt") + FSDP_CHECKPOINT_FILES
    return REQUIRED_CHECKPOINT_FILES


def checkpoint_problem(path: Path) -> str | None:
    """None for a checkpoint that can be resumed from; otherwise why not (files missing, damaged)."""
    if not path.is_dir():
        return "it is not a directory"
    required = required_checkpoint_files(path)
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return "files missing: " + ", ".join(missing)
    return verify_checkpoint(path, required)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads`. FSDP2 ranks hold shards (DTensors): their squares are summed
    over the ranks, so every rank reads the same norm and skips (or keeps) the same update."""
    from sftop.engine.train.fsdp import local_grad_square_sum, sharded_grads

    if sharded_grads(grads):
        squares = local_grad_square_sum(grads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(squares)
        return squares.sqrt()
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


class UpdateGuard(TrainerCallback):
    """Skips an optimizer update whose loss or gradients are NaN/inf, and counts them in a row.

    The gradients are dropped (set to None, which every torch optimizer treats as "no update for
    this parameter", so Adam's moments and step counts stay untouched) and the scheduler step is
    skipped the same way transformers skips it after an fp16 overflow.
    """

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.loss_bad = False  # set by the trainer when a micro-batch loss was not finite
        self.step_bad = False  # the update just attempted was skipped
        self.consecutive = 0
        self.last_grad_norm: float | None = None
        self.failed = False
        # All micro-batch losses of this optimizer step finite, kept on the device: reading it back
        # per micro-batch would stall the host once per micro-batch; it is read with the gradient
        # norm, in the one host sync of an optimizer step.
        self._losses_finite: torch.Tensor | None = None

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record whether a micro-batch loss was finite, without waiting for the GPU."""
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # what the optimizer updates: its few LoRA tensors, not a walk over every module of the model
        source = (
            (p for group in optimizer.param_groups for p in group["params"])
            if optimizer is not None
            else model.parameters()
        )
        params = [p for p in source if p.grad is not None]
        grads_bad = False
        losses_finite, self._losses_finite = self._losses_finite, None
        if params:
            total = _grad_norm([p.grad for p in params])
            flags = [total]
            if losses_finite is not None:
                flags.append(losses_finite.to(device=total.device, dtype=total.dtype))
            read = torch.stack(flags).tolist()  # the one host sync of the step
            grads_bad = not math.isfinite(read[0])
            self.last_grad_norm = None if grads_bad else read[0]
            if len(read) > 1 and read[1] < 1:
                self.loss_bad = True
        elif losses_finite is not None and not bool(losses_finite):
            self.loss_bad = True
        # Each rank of a multi-process run sees only its own micro-batches' losses: a loss that is
        # not finite on one rank (a batch with nothing to score) may come with finite gradients. All
        # ranks must skip the same updates, or their adapters drift apart and one rank stops on a
        # streak of bad steps while the others wait for it.
        grads_bad, self.loss_bad = (bool(flag) for flag in ranks_max([grads_bad, self.loss_bad]))
        self.step_bad = self.loss_bad or grads_bad
        self.loss_bad = False
        if self.step_bad:
            for p in params:
                p.grad = None
            self.consecutive += 1
        else:
            self.consecutive = 0
        if optimizer is not None and getattr(optimizer, "scaler", None) is None:
            optimizer._is_overflow = self.step_bad

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # With an fp16 grad scaler, accelerate recomputes the flag in step(): set it again.
        if self.step_bad and optimizer is not None:
            optimizer._is_overflow = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_bad:
            control.should_save = False  # checkpoints only at good steps: resuming never starts mid-streak
        if self.consecutive >= self.max_bad_steps:
            self.failed = True
            control.should_training_stop = True
            control.should_save = False  # keep the last good checkpoint as the newest one
        return control


class SftopTrainer(SFTTrainer):
    def __init__(
        self,
        *args,
        guard: UpdateGuard,
        save_total_limit: int,
        on_checkpoint: Callable[[int, Path], None] | None = None,
        kernel_loss: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # sftop's fused linear+cross-entropy kernel is on the model's own forward, which SFTTrainer's
        # compute_loss bypasses (it asks TRL's fused LM head for per-token log-probs instead).
        self.sftop_kernel_loss = kernel_loss
        self.sftop_guard = guard
        self.sftop_save_total_limit = save_total_limit
        self.sftop_on_checkpoint = on_checkpoint
        self.sftop_step_tokens = 0
        self.sftop_step_samples = 0
        # token-balanced micro-batches (token_batches.py): a batch sampler over sftop's row order
        self.sftop_token_sampler = None
        self.sftop_flos_per_token: int | None = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from sftop.engine.train.fsdp import enable_on_cpu, fsdp2_active

        if fsdp2_active():
            enable_on_cpu(self)

    def save_model(self, output_dir=None, _internal_call=False):
        """FSDP2: gather the adapter alone (not the frozen base, as transformers' FSDP save would) and
        write it as a one-process run does."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        from sftop.engine.train.fsdp import adapter_state_dict

        state = adapter_state_dict(self.model)  # every rank takes part in the gather
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _get_train_sampler(self, train_dataset=None):
        if self.sftop_token_sampler is not None:
            return self.sftop_token_sampler
        return super()._get_train_sampler(train_dataset)

    def floating_point_ops(self, inputs) -> int:
        """transformers' estimate (6 x tokens x non-embedding parameters, kept in trainer_state.json
        as total_flos) with the parameters counted once: transformers counts them for every
        micro-batch, a walk over every module and parameter (milliseconds of host time per
        micro-batch on a 1B model) for a number that never changes during a run."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self.sftop_flos_per_token is None:
            self.sftop_flos_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return inputs[main_input].numel() * self.sftop_flos_per_token

    def training_step(self, model, inputs, num_items_in_batch=None):
        from sftop.engine.train.buckets import take_padding
        from sftop.engine.train.vision_packing import take_packed_rows

        # a bucketed packed batch (buckets.py) ends in one padding document: neither data nor throughput
        pad_tokens, pad_rows = take_padding(inputs)
        packed_rows = take_packed_rows(inputs)  # a packed VLM batch: its rows share one padding-free row
        if packed_rows is not None:
            tokens, samples = inputs["input_ids"].numel(), packed_rows
        elif "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum() - pad_tokens
            samples = inputs["attention_mask"].shape[0]
        else:  # padding-free: one row of real tokens, documents delimited by cu_seq_lens
            tokens = inputs["input_ids"].numel() - pad_tokens
            samples = inputs["cu_seq_lens_q"].numel() - 1 if "cu_seq_lens_q" in inputs else inputs["input_ids"].shape[0]
            samples -= pad_rows
        self.sftop_step_tokens += tokens
        self.sftop_step_samples += samples
        with train_call_skipped(model):  # transformers' per-step model.train() walks every module
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.sftop_guard.note_loss(loss)
        # The returned loss only feeds the logged average: a non-finite one (its update is skipped)
        # counts as 0 there, decided on the device. transformers' own check (logging_nan_inf_filter,
        # off in build_sft_config) would read every micro-batch's loss back to the host.
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from sftop.engine.train.vision_packing import take_packed_rows

        take_packed_rows(inputs)  # evaluation batches still carry it (training_step took it already)
        if not (self.sftop_kernel_loss and model.training and not return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Same normalisation as TRL's path: summed token loss / trained tokens of the whole step.
        from sftop.kernels.packed_graphs import mark_rows_given, packed_graphed_loss

        # a bucketed packed batch replays its bucket's CUDA graph (None: this one runs eagerly)
        loss = packed_graphed_loss(model, inputs, num_items_in_batch)
        if loss is None:
            mark_rows_given(model, inputs)
            loss = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def take_step_counts(self) -> tuple[int, int]:
        if self.accelerator.num_processes > 1:  # the step's tokens and rows over every rank
            counts = torch.tensor(
                [int(self.sftop_step_tokens), int(self.sftop_step_samples)],
                dtype=torch.int64,
                device=self.accelerator.device,
            )
            torch.distributed.all_reduce(counts)
            self.sftop_step_tokens, self.sftop_step_samples = counts.tolist()
        tokens, samples = int(self.sftop_step_tokens), int(self.sftop_step_samples)
        self.sftop_step_tokens = 0
        self.sftop_step_samples = 0
        return tokens, samples

    def _save_checkpoint(self, model, trial):
        """Write into a temp dir next to the checkpoints, then rename: a checkpoint is complete or absent."""
        if self.accelerator.num_processes > 1:
            return self._save_checkpoint_ranks(model, trial)
        step = self.state.global_step
        root = Path(self.args.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{step}"
        staging = Path(tempfile.mkdtemp(prefix=f".saving-{step}-", dir=root))
        output_dir = self.args.output_dir
        self.args.output_dir = str(staging)
        written = staging / f"{CHECKPOINT_PREFIX}{step}"
        try:
            # Skip SFTTrainer's override: it only adds a model card (README) to every checkpoint.
            Trainer._save_checkpoint(self, model, trial)
            _fsync_tree(written)
            write_manifest(written)  # last: a checkpoint with a manifest was written whole
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)  # the previous checkpoint stays the newest
            if is_disk_full(exc):
                raise DiskFullError(root, self._checkpoint_bytes(root)) from None
            raise
        finally:
            self.args.output_dir = output_dir
        if final.exists():  # saved at this step before (e.g. resumed and stopped at once)
            shutil.rmtree(final)
        os.replace(written, final)
        _fsync_dir(root)
        shutil.rmtree(staging, ignore_errors=True)
        self._rotate_sftop_checkpoints(root)
        if self.sftop_on_checkpoint is not None:
            self.sftop_on_checkpoint(step, final)

    def _save_checkpoint_ranks(self, model, trial):
        """Several processes: every rank writes its part (rank 0 the adapter, optimizer and state,
        each rank its RNG state) into one staging directory; rank 0 seals it with the manifest
        once all have written, and renames it into place."""
        from sftop.engine.train.distributed import barrier

        step = self.state.global_step
        root = Path(self.args.output_dir)
        final = root / f"{CHECKPOINT_PREFIX}{step}"
        staging = root / f".saving-{step}-ranks"
        # each node's first process (save_on_each_node): a node keeps its own complete checkpoints
        main = self.accelerator.is_local_main_process
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        output_dir = self.args.output_dir
        self.args.output_dir = str(staging)
        written = staging / f"{CHECKPOINT_PREFIX}{step}"
        try:
            Trainer._save_checkpoint(self, model, trial)
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError(root, self._checkpoint_bytes(root)) from None
            raise
        finally:
            self.args.output_dir = output_dir
        barrier()  # every rank's files are in
        if main:
            try:
                _fsync_tree(written)
                write_manifest(written)
            except Exception as exc:
                shutil.rmtree(staging, ignore_errors=True)
                if is_disk_full(exc):
                    raise DiskFullError(root, self._checkpoint_bytes(root)) from None
                raise
            if final.exists():
                shutil.rmtree(final)
            os.replace(written, final)
            _fsync_dir(root)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_sftop_checkpoints(root)
        barrier()  # no rank goes on (or stops) before the checkpoint is in place
        if self.sftop_on_checkpoint is not None:
            self.sftop_on_checkpoint(step, final)

    def _checkpoint_bytes(self, root: Path) -> int:
        """What one checkpoint takes: the previous one's size, or the adapter with AdamW's two moments."""
        steps = [
            int(p.name[len(CHECKPOINT_PREFIX) :])
            for p in root.glob(f"{CHECKPOINT_PREFIX}*")
            if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ]
        if steps:
            return tree_bytes(root / f"{CHECKPOINT_PREFIX}{max(steps)}")
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return trainable * 3

    def _rotate_sftop_checkpoints(self, root: Path) -> None:
        done = []
        for child in root.iterdir():
            name = child.name
            if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit() and child.is_dir():
                done.append((int(name[len(CHECKPOINT_PREFIX) :]), child))
        done.sort()
        for _, old in done[: max(0, len(done) - self.sftop_save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
        # Temp dirs of a save that crashed are never loaded; tidy them once they are stale.
        for child in root.glob(".saving-*"):
            try:
                if time.time() - child.stat().st_mtime > 60:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                pass
