"""TRL's SFTTrainer with four additions: atomic checkpoints, NaN/inf update skipping, token counting,
and log lines read one step late (step_readback.py).

Everything else (the loop, packing, loss, optimizer, scheduler, resume) is TRL/transformers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer
from trl import SFTTrainer

from sftop.engine.diskfull import DiskFullError, is_disk_full, tree_bytes
from sftop.engine.rundir import CHECKPOINT_PREFIX
from sftop.engine.train.manifest import verify_checkpoint, write_manifest
from sftop.engine.train.step_readback import HeldValues
from sftop.engine.train.train_mode import train_call_skipped
from sftop.engine.train.update_guard import UpdateGuard

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
        # log lines whose loss and gradient norm are still on their way from the device
        self.sftop_held_logs: list[tuple[HeldValues, int, float | None]] = []
        guard.on_settled = self.sftop_write_held_logs

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

    def _maybe_log_save_evaluate(
        self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None
    ):
        """With the update guard reading one step late, a step's log line is held until the next
        step's update instead of reading its loss here (a wait for the GPU at every step); a
        checkpoint, an evaluation or the run's end reads what is held first."""
        if not self.sftop_guard.lagging:
            return super()._maybe_log_save_evaluate(
                tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate
            )
        control, state = self.control, self.state
        if control.should_log and state.global_step > self._globalstep_last_logged:
            steps = state.global_step - self._globalstep_last_logged
            held = HeldValues(state.global_step, {"loss_sum": tr_loss, "grad_norm": grad_norm})
            tr_loss -= tr_loss  # on the device, after the copy above, as transformers resets it
            rate = self._get_learning_rate() if learning_rate is None else learning_rate
            self.sftop_held_logs.append((held, steps, rate))
            self._globalstep_last_logged = state.global_step
            self.store_flos()
        if control.should_evaluate or control.should_save or control.should_training_stop:
            self.sftop_read_held(control)
        return super()._maybe_log_save_evaluate(
            tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate
        )

    def sftop_read_held(self, control=None) -> None:
        """Read the guard's held verdict (it tells `control`, where given, not to save a bad update
        or to stop), then write the log lines held until then."""
        self.sftop_guard.settle(control, self.lr_scheduler)
        self.sftop_write_held_logs()

    def sftop_write_held_logs(self) -> None:
        """Log the held lines of the steps whose update verdicts the guard has read (transformers'
        own log call, so callbacks, the log history and the run's mean loss see them as before)."""
        settled = self.sftop_guard.settled_through
        while self.sftop_held_logs and settled is not None and self.sftop_held_logs[0][0].step <= settled:
            held, steps, rate = self.sftop_held_logs.pop(0)
            values = held.read()
            loss_sum, grad_norm = values["loss_sum"] or 0.0, values["grad_norm"]
            logs: dict[str, float] = {"loss": loss_sum / steps}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            if rate is not None:
                logs["learning_rate"] = rate
            self._total_loss_scalar += loss_sum
            self.log(logs)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            # A run that fails mid-step (out of memory, a stop) still logs the steps it finished:
            # the last one's line is held until the next step's update, which never comes.
            try:
                self.sftop_read_held()
            except Exception:  # noqa: BLE001 - the failure being raised matters more than a log line
                pass
            raise

    def _finalize_training(self, trial, num_train_samples, start_time):
        self.sftop_read_held(self.control)
        return super()._finalize_training(trial, num_train_samples, start_time)

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
