"""`run_training`: the headless job behind `sftop run` (normally inside the detached supervisor).

Order matters: resolve the plan and write the fully resolved `preset.toml` first (so the run can
be repeated exactly even if it dies while loading), then load model and data, check the disk,
train, and save the adapter. Every outcome ends with exactly one terminal event.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftop.engine.allocator import allocator_settings, configure_allocator
from sftop.engine.diskfull import DiskFullError, is_disk_full
from sftop.engine.errors import ResourceError, SftopError
from sftop.engine.events import (
    Checkpoint,
    EventWriter,
    Message,
    PlanChanged,
    Resumed,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
)
from sftop.engine.presets import save_preset
from sftop.engine.rundir import RunDir
from sftop.engine.runlock import run_lock
from sftop.engine.train.resume_check import check_resume, resume_preset_path
from sftop.engine.train.plan import make_plan, resolved_plan_section
from sftop.engine.train.signals import StopSignals

if TYPE_CHECKING:
    from sftop.engine.models.vision.family import VisionFamily
    from sftop.engine.train.callbacks import RunEvents
    from sftop.engine.train.update_guard import UpdateGuard
    from sftop.engine.train.vision_data import VisionPreparedData

MAX_OOM_RETRIES = 4


class CheckpointError(SftopError):
    """No checkpoint of the run can be loaded."""


class _Tee:
    """Copy Python-level stdout/stderr into stdout.log, unless they already go there (supervisor)."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self._file = None
        self._saved = None

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_path, "a", encoding="utf-8", errors="replace", buffering=1)
        faulthandler.enable(self._file)  # a segfault still leaves a Python stack in the log
        if self._already_logged():
            return self
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _TeeStream(sys.stdout, self._file)
        sys.stderr = _TeeStream(sys.stderr, self._file)
        return self

    def _already_logged(self) -> bool:
        try:
            log = os.stat(self.log_path)
            out = os.fstat(1)
        except OSError:
            return False
        return (log.st_dev, log.st_ino) == (out.st_dev, out.st_ino)

    def __exit__(self, *exc):
        if self._saved is not None:
            tees = (sys.stdout, sys.stderr)
            for tee in tees:
                tee.flush()
            # A stream whose terminal closed would fail again at exit: send it nowhere instead.
            sys.stdout, sys.stderr = (
                saved if getattr(tee, "alive", True) else open(os.devnull, "w", encoding="utf-8")
                for saved, tee in zip(self._saved, tees)
            )
        faulthandler.disable()
        self._file.close()


class _TeeStream:
    """Writes to the terminal and to stdout.log. When the terminal goes away (SIGHUP after an SSH
    drop: writes fail with EIO), output goes on to stdout.log alone and training carries on."""

    def __init__(self, stream, file):
        self._stream = stream
        self._file = file
        self.alive = True

    def write(self, text):
        try:
            self._file.write(text)
        except (ValueError, OSError):
            pass  # log closed during interpreter shutdown, or its disk is full: never fail a run over it
        if self.alive:
            try:
                self._stream.write(text)
            except OSError:
                self.alive = False
        return len(text)

    def flush(self):
        if self.alive:
            try:
                self._stream.flush()
            except OSError:
                self.alive = False
        try:
            self._file.flush()
        except (ValueError, OSError):
            pass

    def isatty(self):
        return self.alive and self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def environment_info(device: str, dtype: str, attn: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": dtype,
        "attn_implementation": attn,
        "cuda": torch.version.cuda,
        "allocator": allocator_settings(),
    }
    from sftop import __version__ as sftop_version

    info["sftop"] = sftop_version
    return info


def pick_checkpoint(run_dir: RunDir, writer: EventWriter, skip: frozenset[Path] = frozenset()) -> Path | None:
    """Newest checkpoint that verifies against its manifest; the others are reported and skipped."""
    from sftop.engine.train.trainer import checkpoint_problem

    for path in reversed(run_dir.complete_checkpoints()):
        if path in skip:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        text = f"Skipping checkpoint {path.name}: {problem}; falling back to the next complete checkpoint"
        print(f"sftop: {text}", flush=True)
        writer.write(Message(level="warning", text=text))
    return None


def _model_config(preset):
    from sftop.engine.planner import load_model_config

    return load_model_config(preset)


def _graph_kernels():
    """sftop.kernels.packed_graphs, or None where there is no Triton, so no kernels and no graphs."""
    try:
        from sftop.kernels import packed_graphs
    except ImportError:
        return None
    return packed_graphs


def release_cuda_graphs(model) -> None:
    """sftop's captured CUDA graphs of `model` and their pool, dropped (no-op without the kernels)."""
    kernels = _graph_kernels()
    if kernels is not None:
        kernels.release_graphs(model)


def cuda_graphs_summary(model) -> dict | None:
    """What sftop's CUDA graphs of `model` did over the run (packed_graphs.graphs_summary), or None."""
    kernels = _graph_kernels()
    return None if kernels is None else kernels.graphs_summary(model)


def graphs_line(summary: dict) -> str:
    """One line for the trainer's log: a run's captures cost several eager steps each."""
    line = (
        f"sftop: CUDA graphs: {summary['captures']} captured in {summary['capture_s']:.1f} s, "
        f"{summary['replays']} replays, {summary['eager_calls']} eager calls"
    )
    if summary["failures"]:
        line += f"; {len(summary['failures'])} refused or failed (first: {summary['failures'][0]})"
    return line


class _Run:
    def __init__(self, preset, run_dir: RunDir, writer: EventWriter, resume: bool):
        self.preset = preset
        self.run_dir = run_dir
        self.writer = writer
        self.resume = resume
        self.step = 0
        self.trainer: Any = None  # the transformers trainer (SFT or DPO) once built
        self.events: RunEvents | None = None  # its callbacks, set with it
        self.guard: UpdateGuard | None = None
        self.signals = StopSignals(run_dir.events, self.saved_step, self.latest_checkpoint)
        # A resume records its resolved preset beside the run's original one, never over it.
        self.preset_path = resume_preset_path(run_dir) if resume else run_dir.preset
        from sftop.engine.gpu_select import rank_info

        self.rank, self.local_rank, self.world_size = rank_info()
        if self.local_rank:  # each node's first rank records the run's preset; the others keep a copy aside
            from sftop.engine.launch import ranks_dir

            self.preset_path = ranks_dir(run_dir) / f"preset-rank-{self.rank}.toml"
        self.t0 = time.time()
        self.probe_verdict: dict[str, Any] | None = None
        self.vision: VisionFamily | None = None  # a vision-language model's family (sftop.engine.models.vision)
        self.vision_data: VisionPreparedData | None = None
        self.packing_reason: str | None = None
        self.buckets_reason: str | None = None  # train.length_buckets: what it came to, and why

    def latest_checkpoint(self) -> str | None:
        path = self.run_dir.latest_checkpoint()
        return str(path) if path else None

    def saved_step(self) -> int:
        """The step of the newest checkpoint on disk: where a resume would start."""
        path = self.run_dir.latest_checkpoint()
        return int(path.name.split("-")[-1]) if path else 0

    def message(self, text: str, level: str = "info") -> None:
        print(f"sftop: {text}", flush=True)
        self.writer.write(Message(level=level, text=text))

    # ------------------------------------------------------------------ setup
    def resolve(self):
        import torch

        from sftop.engine.models.loading import resolve_attn_implementation, resolve_dtype

        preset = self.preset
        config = _model_config(preset)
        image_tokens = self.prepare_vision_data(config)
        # reads GPUs through NVML: CUDA itself is not started yet
        self.force_cpu()
        preset = self.replan_for_processes(self.keep_predated_keys(preset))
        self.plan = make_plan(preset, config, image_tokens_per_row=image_tokens)
        self.place_rank()
        self.pin_gpu()
        self.hold_to_cap()
        on_cuda = torch.cuda.is_available()
        dtype = resolve_dtype(preset.model.dtype, on_cuda)
        attn = resolve_attn_implementation(preset.model.attn_implementation, dtype, on_cuda)
        data = preset.model_dump(mode="json")
        data["model"].update(dtype=dtype, attn_implementation=attn)
        data["plan"].update(resolved_plan_section(self.plan))
        from sftop.engine.presets import Preset

        self.preset = Preset.model_validate(data)
        save_preset(self.preset, self.preset_path)

    def prepare_vision_data(self, config) -> list[int] | None:
        """A VLM's rows are checked (images opened, exact lengths) before planning: the planner sizes
        the image terms from their image tokens. Returns those counts; None for a text model."""
        from sftop.engine.models.vision.loading import family_of

        self.vision = family_of(config)
        if self.vision is None:
            return None
        from sftop.engine.models.vision.loading import load_processor
        from sftop.engine.train.vision_data import prepare_vision_data

        processor = load_processor(self.preset.model, self.vision)
        if self.preset.train.task == "dpo":
            from sftop.engine.train.vision_dpo_data import prepare_vision_preferences as prepare_vision_data
        self.vision_data = prepare_vision_data(self.preset, processor, self.vision)
        self.message(
            f"{self.vision.display_name} vision-language model: {len(self.vision_data.image_tokens_per_row)} "
            f"{'pairs' if self.preset.train.task == 'dpo' else 'rows'} checked with their images, "
            f"{self.vision_data.report.bad_rows} skipped"
        )
        return self.vision_data.image_tokens_per_row

    def force_cpu(self) -> None:
        """plan.device = "cpu": hide the GPUs before CUDA starts, so torch trains on the CPU."""
        import torch

        if self.preset.plan.device == "cpu" and not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ""

    def place_rank(self) -> None:
        """One of several processes: this rank trains on cuda:LOCAL_RANK (the supervisor left
        exactly the chosen GPUs visible, in rank order)."""
        import dataclasses

        if not str(self.plan.device).startswith("cuda"):
            from sftop.engine.train.distributed import read_indexed_cpu_tensors

            read_indexed_cpu_tensors()  # a checkpoint of CPU ranks, read by any number of processes
            return
        if self.world_size == 1:
            return
        import torch

        device = f"cuda:{self.local_rank}"
        torch.cuda.set_device(self.local_rank)
        self.plan = dataclasses.replace(self.plan, device=device)
        if self.plan.context is not None:
            self.plan.context.device = device  # replans (OOM step-down) keep this rank's device

    def keep_predated_keys(self, preset):
        """A resume of a run recorded before a key that decides which rows each step holds
        (train.equal_token_steps): the run goes on as it trained, whatever the preset says, since
        steps composed otherwise mid-epoch would train some rows twice and skip others."""
        if not self.resume:
            return preset
        from sftop.engine.train.resume_check import predated_keys

        data = preset.model_dump(mode="json")
        kept = []
        for key, value in predated_keys(self.run_dir).items():
            section, name = key.split(".")
            if data[section].get(name) != value:
                data[section][name] = value
                kept.append(f'{key} = "{value}"')
        if not kept:
            return preset
        self.message(f"Resuming a run recorded before these keys existed, as it trained: {', '.join(kept)}")
        from sftop.engine.presets import Preset

        return Preset.model_validate(data)

    def replan_for_processes(self, preset):
        """A resume on another number of processes than the run recorded: the recorded per-process
        micro-batch and accumulation are planned again ("auto") so that micro-batch x accumulation x
        processes stays the effective batch. The rows of each optimizer step stay the same (the data
        order is global and each step takes the next effective-batch rows), so the curve continues."""
        if not self.resume:
            return preset
        from sftop.engine.train.resume_check import _read_original

        original = (_read_original(self.run_dir) or {}).get("plan", {})
        before = original.get("gpus")
        before = before if isinstance(before, int) else 1
        if before == self.world_size:
            return preset
        plan = preset.plan
        # several processes split each step's rows in the Trainer's order: a resume keeps that order
        split = {"split_by": "rows"} if plan.split_by == "auto" else {}
        if (plan.micro_batch, plan.grad_accum) != (original.get("micro_batch"), original.get("grad_accum")):
            return preset.model_copy(update={"plan": plan.model_copy(update=split)})  # its own values, checked
        self.message(
            f"Resuming on {self.world_size} process{'es' if self.world_size > 1 else ''} instead of "
            f"{before}: micro-batch and accumulation planned again, effective batch "
            f"{preset.train.effective_batch} kept"
            + ("; each step's rows split in the trainer's order, as several processes do" if split else "")
        )
        return preset.model_copy(
            update={"plan": plan.model_copy(update={"micro_batch": "auto", "grad_accum": "auto", **split})}
        )

    def stop_requested(self) -> str | None:
        """The stop request, agreed by every rank (one all-reduce per step under several processes)."""
        local = self.signals.requested
        if self.world_size == 1:
            return local
        from sftop.engine.launch import stop_file
        from sftop.engine.train.distributed import agreed_stop

        if local is None and stop_file(self.run_dir).exists():
            local = "SIGTERM"
        return agreed_stop(local)

    def pin_gpu(self) -> None:
        """Make the plan's GPU the only one this process sees (it becomes cuda:0).

        The planner picks the GPU with the most free memory; SFTTrainer refuses to run with several
        visible GPUs in one process. Must happen before CUDA starts, or the setting is ignored.
        """
        import dataclasses

        import torch

        uuid = getattr(self.plan, "gpu_uuid", None)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not uuid or (visible is not None and len([v for v in visible.split(",") if v.strip()]) == 1):
            return
        if torch.cuda.is_initialized():
            return
        os.environ["CUDA_VISIBLE_DEVICES"] = uuid
        self.plan = dataclasses.replace(self.plan, device="cuda:0")
        self.message(f"Using GPU {uuid} (most free memory), seen by this run as cuda:0")

    def hold_to_cap(self) -> None:
        """Hold torch's allocator to the user's memory cap, so that this run fails over to a smaller
        plan (probe, OOM step-down) rather than grow into a GPU it shares."""
        from sftop.engine.planner.cap import hold_to_cap

        fraction = hold_to_cap(getattr(self.plan, "max_memory_gib", None), getattr(self.plan, "device", "cpu"))
        if fraction is not None:
            self.message(
                f"GPU memory capped at {self.plan.max_memory_gib:.2f} GiB ({self.plan.memory_cap}): "
                f"the allocator may reserve {fraction:.1%} of the GPU"
            )

    def load(self):
        from sftop.engine.data import prepare_data
        from sftop.engine.models.loading import load_model
        from sftop.engine.train.config import optimizer_name
        from sftop.engine.train.fsdp import fsdp2_active, start_group
        from sftop.engine.train.packing import packing_isolated

        if fsdp2_active():
            start_group()  # before loading: rank 0 alone reads the weights
            if self.preset.model.load_in_4bit:
                from sftop.engine.train.fsdp import choose_4bit_load

                weights = float(self.plan.breakdown.get("weights", 0.0))
                where = choose_4bit_load(weights, float(self.plan.budget_gib))
                self.message(
                    f"FSDP-QLoRA: {weights:.1f} GiB of 4-bit weights quantized on the {where.upper()}"
                    + (", then each GPU receives its shard" if where == "cpu" else ", then sharded")
                )
        self.model, self.tokenizer, self.info = load_model(self.preset, self.plan)
        if self.vision is not None:
            self.data = self.vision_data
            self.pack_vision_rows()
        elif self.preset.train.task == "dpo":
            from sftop.engine.data.preference_prepare import prepare_preferences

            self.data = prepare_preferences(self.preset, self.tokenizer)
            self.packing = False  # DPO pads its pairs
        else:
            self.data = prepare_data(self.preset, self.tokenizer)
            self.packing = self.preset.data.packing
        if self.packing:
            self.size_plan_for_data()
        if self.packing and self.vision is None:
            ok, detail = packing_isolated(self.model, len(self.tokenizer), self.tokenizer.pad_token_id)
            if not ok:
                self.packing = False
                self.message(
                    "Packing turned off: this model's attention lets packed documents see each other "
                    f"({detail}); training on padded batches instead",
                    level="warning",
                )
                self.preset = self.preset.model_copy(
                    update={"data": self.preset.data.model_copy(update={"packing": False})}
                )
                save_preset(self.preset, self.preset_path)  # record what the run really does
        _, note = optimizer_name(self.preset.train.optimizer, self.info.device.startswith("cuda"))
        if note:
            self.message(note, level="warning")

    def pack_vision_rows(self) -> None:
        """A VLM packs its micro-batches where its family's packed rows are checked equal to unpacked
        ones (sftop/engine/train/vision_packing.py) and the loaded model keeps samples apart."""
        from sftop.engine.models.vision.packing import packing_refusal
        from sftop.engine.train.vision_packing import PackedVisionBatches, vision_packing_isolated

        family = self.vision
        assert family is not None, "pack_vision_rows() is for vision-language runs"
        name = family.display_name
        refusal = "DPO pads its pairs" if self.preset.train.task == "dpo" else packing_refusal(family)
        self.packing = bool(self.preset.data.packing) and refusal is None
        if self.packing:
            packer = family.packer(self.model)
            ok, detail = vision_packing_isolated(self.model, packer)
            if ok:
                self.packing_reason = (
                    f"{name}: the rows of each micro-batch packed into one padding-free row, "
                    f"attention and {packer.positions} per sample"
                )
                self.data.collator = PackedVisionBatches(self.data.collator, packer)
                return
            self.packing = False
            refusal = f"this model's attention lets packed samples see each other ({detail})"
        if not self.preset.data.packing:
            self.packing_reason = "data.packing = false"
            return
        self.packing_reason = f"{name}: {refusal}; rows are padded per batch"
        self.message(f"Packing turned off: {self.packing_reason}")
        self.preset = self.preset.model_copy(update={"data": self.preset.data.model_copy(update={"packing": False})})
        save_preset(self.preset, self.preset_path)  # a resume's own copy, never the original

    def disk_needs(self) -> dict[str, int]:
        from sftop.engine.train.resources import expected_disk_bytes

        return expected_disk_bytes(
            trainable_params=self.info.params_trainable,
            total_params=self.info.params_total,
            save_total_limit=self.preset.train.save_total_limit,
        )

    def disk_needed(self) -> int | None:
        """Bytes the whole run writes, once the model is known (for a "disk full" message)."""
        return sum(self.disk_needs().values()) if hasattr(self, "info") else None

    def check_disk(self):
        from sftop.engine.train.resources import check_disk_space

        check_disk_space(self.run_dir.path, self.disk_needs())

    # ------------------------------------------------------------------ training
    def build_trainer(self):
        import torch

        self.apply_plan_to_kernels()
        if self.preset.train.task == "dpo":
            from sftop.engine.train.dpo import build_dpo_trainer

            return build_dpo_trainer(self)

        from sftop.engine.train.callbacks import RunEvents
        from sftop.engine.train.config import build_sft_config
        from sftop.engine.train.fsdp import fsdp2_active
        from sftop.engine.train.trainer import SftopTrainer
        from sftop.engine.train.update_guard import UpdateGuard
        from sftop.engine.train.zero_grad import OptimizerZeroGrad

        on_cuda = torch.cuda.is_available()
        args = build_sft_config(
            self.preset,
            self.plan,
            output_dir=self.run_dir.checkpoints,
            dtype=self.info.dtype,
            packing=self.packing,
            has_eval=self.data.eval is not None,
            on_cuda=on_cuda,
            vision=self.vision is not None,
        )
        guard = UpdateGuard(self.preset.train.max_bad_steps, lag=True)  # one process: the guard checks it
        events = RunEvents(
            self.writer,
            started=self.started_event,
            stop_requested=self.stop_requested,
            checkpoint_request=self.run_dir.path / "control" / "checkpoint",
        )
        from sftop.engine.train.samples import SampleAnswers, sample_interval

        samples = SampleAnswers(
            self.writer, self.tokenizer, self.preset.train.sample_prompts, sample_interval(self.preset.train)
        )
        trainer = SftopTrainer(
            model=self.model,
            args=args,
            train_dataset=self.data.train,
            eval_dataset=self.data.eval,
            processing_class=self.tokenizer,
            # the sample answers are the same on every rank: rank 0 writes them (under FSDP2 every
            # rank generates with it, since each forward gathers the sharded weights from all)
            callbacks=[guard, events, OptimizerZeroGrad()] + ([samples] if self.rank == 0 or fsdp2_active() else []),
            guard=guard,
            save_total_limit=self.preset.train.save_total_limit,
            on_checkpoint=self.on_checkpoint,
            kernel_loss=(self.info.kernels.get("parts") or {}).get("loss") == "fused",
            **({"data_collator": self.data.collator} if self.vision is not None else {}),
        )
        trainer.sftop_token_sampler = self.token_sampler(trainer.train_dataset)
        self.bucket_batches(trainer)
        from sftop.engine.train.profiling import profiler_callback

        profiler = profiler_callback(self.run_dir.path)  # benchmarks/whole_run.py --profile
        if profiler is not None and self.rank == 0:
            trainer.add_callback(profiler)
        # One readable line per step (RunEvents prints it) instead of transformers' raw log dicts.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        events.trainer = trainer
        events.guard = guard
        self.events, self.guard, self.trainer = events, guard, trainer
        return trainer

    def size_plan_for_data(self) -> None:
        """Packed runs: size the plan for the rows' real lengths (the longest micro-batch is the
        micro_batch longest rows, padded to its bucket), not micro_batch x max_length."""
        import pyarrow.compute as pc

        from sftop.engine.planner.solve import size_for_data
        from sftop.engine.train.plan_data import bucket_multiple, token_split_for

        if self.plan is None or getattr(self.plan, "context", None) is None:
            return
        if self.vision is not None:
            # with their image tokens; a VLM's rows stay in the Trainer's order, b per micro-batch
            lengths = self.data.train_lengths
            split = None
        else:
            lengths = pc.list_value_length(self.data.train.data.column("input_ids")).to_pylist()
            split = token_split_for(self.preset, len(lengths), self.plan.effective_batch)
        self.train_lengths = lengths
        new = size_for_data(self.plan, lengths, bucket_multiple(self.preset, self.packed_graphs_on()), split=split)
        old = self.plan
        same = (new.micro_batch, new.gradient_checkpointing, new.checkpoint_every_n_layers) == (
            old.micro_batch,
            old.gradient_checkpointing,
            old.checkpoint_every_n_layers,
        )
        equal = ", steps of about equal tokens" if split is not None and split.balanced else ""
        if same:
            self.plan = new
            if new.split_by == "tokens":
                self.message(f"Plan {new.describe()}: sized for the data's largest micro-batch{equal}")
            return
        if new.split_by == "tokens":
            reason = (
                f"sized for the data: each step's {new.effective_batch} rows split by tokens into "
                f"{new.grad_accum} micro-batch(es), the largest of the run {new.tokens_per_micro_batch} tokens" + equal
            )
        else:
            reason = (
                f"sized for the data: the longest packed micro-batch of {new.micro_batch} rows holds "
                f"{new.tokens_per_micro_batch} tokens, not {new.micro_batch} x {old.max_length}"
            )
        self.set_plan(new, 0, reason)
        self.message(f"Plan {old.describe()} -> {new.describe()}: {reason}")

    def token_sampler(self, dataset=None):
        """The batch sampler of a plan split by tokens (None otherwise). `dataset`: the trainer's own
        training set, which must hold the rows the plan was sized for, in the same order."""
        if not (
            self.packing and getattr(self.plan, "split_by", "rows") == "tokens" and getattr(self, "train_lengths", None)
        ):
            return None
        from sftop.engine.train.plan_data import equal_token_steps
        from sftop.engine.train.token_batches import TokenBalancedSampler

        if dataset is not None and len(dataset) != len(self.train_lengths):
            raise RuntimeError(
                f"the trainer holds {len(dataset)} training rows but the plan was sized for {len(self.train_lengths)}: "
                'its micro-batches split by tokens would not be the ones sized; set plan.split_by = "rows" '
                "and report this"
            )
        return TokenBalancedSampler(
            self.train_lengths,
            self.plan.effective_batch,
            self.plan.grad_accum,
            self.preset.train.seed,
            balanced=equal_token_steps(self.preset),  # the steps size_plan_for_data sized the plan for
        )

    def packed_graphs_on(self) -> bool:
        """Can packed micro-batches replay CUDA graphs here (sftop/kernels/packed_graphs.py)? Needs
        the graphs part and sftop's packed attention, whose row boundaries stay on the GPU."""
        parts = self.info.kernels.get("parts") or {}
        return parts.get("cuda_graphs") == "fused" and parts.get("attention") == "fused"

    def bucket_batches(self, trainer) -> None:
        """Pad packed micro-batches to a few lengths (train.length_buckets) so that their CUDA graphs replay."""
        import math

        import pyarrow.compute as pc

        from sftop.engine.train.buckets import BucketedCollator, bucket_sizes, buckets_wanted, data_bucket_sizes

        setting = self.preset.train.length_buckets
        if not self.packing:
            return
        if self.vision is not None:
            # packed graphs take token ids and row boundaries only, not a VLM's pixels and 3-D positions
            if setting != "off":
                self.buckets_reason = (
                    "off: a vision-language batch carries images, which packed CUDA graphs do not take"
                )
            return
        if not buckets_wanted(setting, self.packed_graphs_on()):
            if setting == "auto":
                self.buckets_reason = "off: packed micro-batches cannot replay CUDA graphs here"
            return
        refused = getattr(self.plan, "graphs_refused", None)
        if refused and setting == "auto":
            # padding to a bucket only pays where the bucket's graph replays
            self.buckets_reason = f"off: the plan trains eagerly ({refused})"
            return
        args = trainer.args
        limited = bool(args.max_steps and args.max_steps > 0)
        sampler = getattr(trainer, "sftop_token_sampler", None)
        if sampler is not None:
            # steps split by tokens: every micro-batch of the run is known, fit the buckets to them all
            from sftop.engine.planner.token_split import micro_batch_tokens
            from sftop.engine.train.buckets import fitted_bucket_sizes

            per_epoch = max(1, len(sampler))
            epochs = max(1, math.ceil(args.num_train_epochs))
            micro_batches = args.max_steps * self.plan.grad_accum if limited else len(sampler) * epochs
            if limited:
                epochs = max(1, math.ceil(micro_batches / per_epoch))
            run = micro_batch_tokens(
                sampler.lengths, sampler.rows_per_step, sampler.micro_batches, sampler.seed, epochs, sampler.balanced
            )[:micro_batches]
            sizes = fitted_bucket_sizes(run, micro_batches)
        else:
            lengths = pc.list_value_length(self.data.train.data.column("input_ids")).to_pylist()
            micro_batches = (
                args.max_steps * self.plan.grad_accum
                if limited
                else math.ceil(len(lengths) / self.plan.micro_batch) * math.ceil(args.num_train_epochs)
            )
            sizes = data_bucket_sizes(lengths, self.plan.micro_batch, micro_batches, seed=self.preset.train.seed)
        if sizes:
            self.buckets_reason = (
                f"on: {len(sizes)} lengths fitted to the data ({', '.join(map(str, sizes))} tokens) "
                f"for {micro_batches:,} micro-batches"
                + (" of equal-token steps" if sampler is not None and sampler.balanced else "")
            )
            # each fitted length recurs: its graph is captured at its first sighting
            from sftop.kernels.packed_graphs import expect_length_buckets

            expect_length_buckets(self.model, sizes)
        elif setting == "on":
            # asked for on a run too short to fit buckets to: the plan's fixed ladder
            sizes = bucket_sizes(int(self.plan.tokens_per_micro_batch))
            self.buckets_reason = f"on (train.length_buckets = on): {len(sizes)} fixed lengths up to {sizes[-1]} tokens"
        else:
            self.buckets_reason = (
                f"off: {micro_batches:,} micro-batches are too few, or too mixed in length, for "
                "buckets to pay for their CUDA graph captures"
            )
            return
        trainer.data_collator = BucketedCollator(trainer.data_collator, sizes, self.tokenizer.pad_token_id)

    def started_event(self, total_steps: int) -> RunStarted:
        return RunStarted(
            run_dir=str(self.run_dir.path),
            preset=self.preset.model_dump(mode="json"),
            environment={
                **environment_info(self.info.device, self.info.dtype, self.info.attn_implementation),
                "model": self.info.to_dict(),
                "packing": self.packing,
                **({"packing_reason": self.packing_reason} if self.packing_reason else {}),
                **({"distributed": self.distributed_info()} if self.world_size > 1 else {}),
                **({"length_buckets": self.buckets_reason} if self.buckets_reason else {}),
            },
            plan={**self.plan.to_dict(), **({"probe": self.probe_verdict} if self.probe_verdict else {})},
            kernels=self.info.kernels,
            data=self.data.to_dict(),
            total_steps=total_steps,
            resumed_from_step=self.resumed_from,
        )

    def distributed_info(self) -> dict[str, Any]:
        import torch.distributed as dist

        from sftop.engine.train.fsdp import distributed_notes, fsdp2_active

        fsdp2: dict[str, Any] = distributed_notes() if fsdp2_active() else {}
        if fsdp2 and self.trainer is not None:
            from sftop.engine.train.fsdp import sharded_parameters

            fsdp2["parameters"] = sharded_parameters(self.trainer.model)
        return {
            "world_size": self.world_size,
            "strategy": getattr(self.plan, "strategy", "ddp"),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "rank_events": "ranks/rank-N.jsonl (rank 0: events.jsonl)",
            "cuda_graphs": "off: DDP's gradient all-reduce hooks run outside a replayed CUDA graph, so a replayed "
            "step would skip them",
            "probe": "every rank, judged by the fullest GPU"
            if getattr(self.plan, "strategy", "ddp") == "ddp"
            else "skipped under FSDP2: the plan's per-GPU sizing and the out-of-memory step-down apply",
            **fsdp2,
        }

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.step = step
        self.writer.write(Checkpoint(step=step, path=str(path)))

    def train(self) -> int:
        import torch

        checkpoint = pick_checkpoint(self.run_dir, self.writer) if self.resume else None
        from sftop.engine.train.fsdp import refuse_single_process_resume

        refuse_single_process_resume(checkpoint, self.world_size)
        if self.resume and checkpoint is None:
            self.message("No complete checkpoint to resume from: starting from step 0", level="warning")
        unloadable: set[Path] = set()
        attempt = 0
        while attempt <= MAX_OOM_RETRIES:
            self.resumed_from = int(checkpoint.name.split("-")[-1]) if checkpoint else None
            if self.resume:
                # Steps after this one in events.jsonl were logged by the attempt that died: a reader
                # drops them, as the dashboard's curve does, and takes the replayed ones.
                self.writer.write(
                    Resumed(step=self.resumed_from or 0, checkpoint=str(checkpoint) if checkpoint else None)
                )
            trainer = self.build_trainer()
            if attempt == 0:
                trainer = self.probe()
            stop = self.stop_requested()
            if stop:  # stopped while loading: nothing trained, nothing to save
                self.writer.write(
                    RunStopped(
                        step=self.resumed_from or 0, signal=stop, checkpoint=str(checkpoint) if checkpoint else None
                    )
                )
                return 0
            try:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
                break
            except torch.cuda.OutOfMemoryError as exc:
                oom = (str(exc).splitlines() or ["out of memory"])[0][:200]
            except Exception as exc:
                if checkpoint is None or not _while_loading(exc):
                    raise
                unloadable.add(checkpoint)
                checkpoint = self.fall_back(checkpoint, exc, frozenset(unloadable))
                continue
            attempt += 1
            # Outside the except block, so the traceback no longer pins the failed step's tensors.
            step = trainer.state.global_step
            self.step = step
            trainer = None
            if self.world_size > 1:
                raise self.oom_on_one_rank(step, oom)
            checkpoint = self.recover_from_oom(step, oom)
        else:
            raise ResourceError(
                f"Ran out of GPU memory {MAX_OOM_RETRIES + 1} times, even after making the micro-batch smaller",
                where="GPU memory",
                hint="Set model.load_in_4bit = true, lower data.max_length, or use a bigger GPU",
            )
        return self.finish()

    def fall_back(self, bad: Path, exc: Exception, skip: frozenset[Path]) -> Path | None:
        """`bad` verified but did not load (e.g. the restricted loader refused a pickle in it)."""
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        found = pick_checkpoint(self.run_dir, self.writer, skip)
        if found is None:
            raise CheckpointError(
                f"Checkpoint {bad.name} could not be loaded ({type(exc).__name__}: {why}), and no older complete "
                "checkpoint is left to fall back to",
                where=str(bad),
                hint=f"Move {bad} aside and resume to start again from step 0, or start a new run",
            ) from None
        self.message(
            f"Checkpoint {bad.name} could not be loaded ({type(exc).__name__}: {why}); falling back to {found.name}",
            level="warning",
        )
        self.trainer = self.events = self.guard = None
        gc.collect()
        return found

    def apply_plan_to_kernels(self) -> None:
        """What the plan decided for the kernels, for everything this process computes from now on:
        the fused loss's logits chunk (Plan.loss_chunk_mib: smaller where the default leaves CUDA
        graphs' pool no room), and no captures where the pool does not fit at all
        (Plan.graphs_refused).  build_trainer calls it: every plan change (data sizing, probe,
        out-of-memory step-down) is followed by a new trainer before the next step."""
        mib = getattr(self.plan, "loss_chunk_mib", None)
        try:
            from sftop.kernels.cuda_graphs import refuse_captures
            from sftop.kernels.fused_linear_cross_entropy import set_chunk_bytes
        except ImportError:  # no Triton: no fused loss to size, no graphs
            return
        set_chunk_bytes(None if mib is None else int(mib) << 20)
        refuse_captures(getattr(self.plan, "graphs_refused", None))

    def set_plan(self, new, step: int, reason: str) -> None:
        """Switch to a smaller plan: record it, and make preset.toml repeat the plan that fits."""
        from sftop.engine.presets import Preset

        self.writer.write(PlanChanged(step=step, reason=reason, old=self.plan.to_dict(), new=new.to_dict()))
        self.plan = new
        data = self.preset.model_dump(mode="json")
        data["plan"].update(resolved_plan_section(new))
        self.preset = Preset.model_validate(data)
        if self.rank == 0:  # every rank takes the same plan; one writes the file they share
            save_preset(self.preset, self.preset_path)

    def probe(self, memory=None):
        """On a GPU, measure one step at the plan's largest shape and step the plan down until it fits.

        `memory` is the allocator to read (the planner's CudaMemory by default).
        """
        if not str(getattr(self.plan, "device", "cpu")).startswith("cuda"):
            return self.trainer
        if self.world_size > 1 and getattr(self.plan, "strategy", "ddp") != "ddp":
            # Under FSDP2 a step gathers each layer's shards from the other ranks: a probe step
            # outside accelerate's sharded model would hold the whole model on every GPU.
            self.probe_verdict = {"skipped": "FSDP2: the plan's per-GPU sizing and the OOM step-down apply"}
            return self.trainer
        if self.vision is not None:
            # The probe's synthetic batches are text only: they would measure a VLM step without
            # its images. The plan's image terms and the OOM step-down cover VLM runs.
            return self.trainer
        from sftop.engine.planner.verify import run_probe
        from sftop.engine.train.probe import probe_step

        def step_fn(rows: int, tokens_per_row: int) -> None:
            probe_step(self.trainer, rows, tokens_per_row, self.preset.data.max_length)

        if self.world_size > 1:
            # DDP: every rank probes the same synthetic batch on the model before DDP wraps it (no
            # collective in its backward), and all take the verdict of the fullest GPU.
            from sftop.engine.planner.verify import CudaMemory
            from sftop.engine.train.distributed import RanksMemory, probe_on_every_rank

            memory = RanksMemory(memory or CudaMemory(self.plan.device))
            step_fn = probe_on_every_rank(step_fn, memory.oom_error)

        def on_change(old, new, reason: str) -> None:
            self.set_plan(new, 0, reason)
            self.message(f"Plan stepped down before training: {reason}", level="warning")
            self.trainer = None
            self.build_trainer()

        _, verdicts = run_probe(self.plan, step_fn, memory=memory, on_change=on_change)
        if verdicts:
            last = verdicts[-1].to_dict()
            last.pop("next_plan", None)
            self.probe_verdict = last
        return self.trainer

    def oom_on_one_rank(self, step: int, error: str) -> ResourceError:
        """Under several processes one rank cannot step down alone: the others wait in a collective
        for a step it will never finish, until the timeout fails the run minutes later. End the run
        now instead (the launcher stops the other ranks), saying which plan to resume with."""
        from sftop.engine.planner import on_oom

        new = on_oom(self.plan, step)
        return ResourceError(
            f"Rank {self.rank} ran out of GPU memory at step {step} ({error}). The processes of a multi-process "
            "run cannot each step down to a smaller micro-batch alone, so the run stops here",
            where=f"GPU memory of rank {self.rank}",
            hint=f"Resume from the last checkpoint with a smaller micro-batch (the effective batch stays "
            f"{new.effective_batch}): sftop resume {self.run_dir.path.name} --set plan.micro_batch={new.micro_batch}",
        )

    def recover_from_oom(self, step: int, error: str) -> Path | None:
        """Smaller micro-batch, more accumulation (same effective batch), from the last checkpoint."""
        import torch

        old = self.plan
        from sftop.engine.planner import on_oom

        new = on_oom(old, step)
        self.set_plan(new, step, f"out of memory at step {step}")
        # Drop every reference to the failed step's tensors before trying again, and the CUDA
        # graphs captured for the old plan's shapes with their pool: the smaller plan needs that memory.
        for p in self.model.parameters():
            p.grad = None
        release_cuda_graphs(self.model)
        self.trainer = self.events = self.guard = None
        gc.collect()
        torch.cuda.empty_cache()
        checkpoint = pick_checkpoint(self.run_dir, self.writer)
        self.message(
            f"Out of GPU memory at step {step} ({error}): continuing with micro_batch {new.micro_batch} x "
            f"grad_accum {new.grad_accum} from {checkpoint.name if checkpoint else 'the start'}",
            level="warning",
        )
        return checkpoint

    def finish(self) -> int:
        trainer, guard, events = self.trainer, self.guard, self.events
        assert guard is not None and events is not None, "finish() follows build_trainer()"
        step = trainer.state.global_step
        self.step = step
        if guard.failed:
            self.writer.write(
                RunFailed(
                    step=step,
                    reason=f"{guard.consecutive} optimizer steps in a row had a NaN/inf loss or gradient "
                    f"(train.max_bad_steps = {self.preset.train.max_bad_steps}); try a lower learning_rate "
                    f"or max_grad_norm, or check the data",
                    checkpoint=self.latest_checkpoint(),
                )
            )
            return 4
        if events.stopped_by and step < trainer.state.max_steps:  # a stop on the last step is a finish
            print(
                f"sftop: stopped at step {step} ({events.stopped_by}); resume with `sftop resume {self.run_dir.path}`",
                flush=True,
            )
            self.writer.write(RunStopped(step=step, signal=events.stopped_by, checkpoint=self.latest_checkpoint()))
            return 0
        adapter = self.save_adapter()
        loss = "n/a" if events.last_loss is None else f"{events.last_loss:.4f}"
        graphs = cuda_graphs_summary(self.model)
        if graphs is not None:
            print(graphs_line(graphs), flush=True)
        print(f"sftop: finished at step {step}, final loss {loss}; adapter saved to {adapter}", flush=True)
        self.writer.write(
            RunFinished(
                step=step,
                final_loss=events.last_loss,
                adapter_path=str(adapter),
                runtime_s=round(time.time() - self.t0, 2),
                graphs=graphs,
            )
        )
        return 0

    def save_adapter(self) -> Path:
        """PEFT adapter + tokenizer into RUN_DIR/adapter, via a temp dir and a rename."""
        target = self.run_dir.adapter
        from sftop.engine.train.fsdp import adapter_state_dict, fsdp2_active

        # FSDP2: every rank holds a shard of the adapter; all take part in gathering it whole
        gathered = {"state_dict": adapter_state_dict(self.trainer.model)} if fsdp2_active() else {}
        if self.local_rank:  # the adapter is the same on every rank: each node's first process saves it
            return target
        tmp = target.with_name(".adapter-saving")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # a DPO run's frozen reference adapter ("ref") is not part of the result
            self.trainer.model.save_pretrained(tmp, **getattr(self.trainer, "sftop_save_kwargs", {}), **gathered)
            self.tokenizer.save_pretrained(tmp)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                needed = sum(p.numel() * p.element_size() for p in self.trainer.model.parameters() if p.requires_grad)
                raise DiskFullError(self.run_dir.path, needed) from None
            raise
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target


def run_training(preset, run_dir, *, resume: bool = False) -> int:
    """Run (or resume) training into `run_dir`; returns the process exit code. Never raises for user errors."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    # Refusals come before anything is written: a live trainer's directory and a run's record stay as they are.
    try:
        run_dir.create()
        with run_lock(run_dir.path):
            if resume:
                check_resume(run_dir, preset)
            return _run_locked(preset, run_dir, resume)
    except SftopError as exc:
        print(f"sftop: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        error = DiskFullError(run_dir.path, None)
        print(f"sftop: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code


def _run_locked(preset, run_dir: RunDir, resume: bool) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoids fork warnings + deadlocks in datasets.map
    configure_allocator()  # before anything initialises CUDA (foreground runs; the supervisor sets it too)
    from sftop.engine.gpu_select import rank_info
    from sftop.engine.launch import rank_events_path, rank_pid_path

    rank, _, world = rank_info()
    if world > 1:
        from sftop.engine.train.distributed import write_pid

        write_pid(rank_pid_path(run_dir, rank))
    # rank 0 writes the run's events; every other rank its own (its steps hold its memory)
    events_path = rank_events_path(run_dir, rank) if rank else run_dir.events
    with _Tee(run_dir.stdout_log), EventWriter(events_path) as writer:
        run = _Run(preset, run_dir, writer, resume)
        run.signals.install()
        try:
            if not run_dir.preset.exists():
                # Even a run that fails while resolving is listed (`sftop runs`) and can be repeated.
                save_preset(preset, run_dir.preset)
            run.resolve()
            run.load()
            run.check_disk()
            code = run.train()
            if world > 1:
                _leave_process_group()
            return code
        except Exception as exc:  # noqa: BLE001 - every outcome ends with one terminal event
            if not isinstance(exc, SftopError) and is_disk_full(exc):
                exc = DiskFullError(run_dir.path, run.disk_needed())
            if isinstance(exc, SftopError):
                print(f"sftop: error: {exc}", file=sys.stderr, flush=True)
                reason, code = str(exc), exc.exit_code
            else:  # a bug: keep the traceback in stdout.log, end the run cleanly
                traceback.print_exc()
                reason = f"internal error ({type(exc).__name__}: {exc}); the traceback is in {run_dir.stdout_log}"
                code = 1
            failed = RunFailed(step=_step(run), reason=reason, checkpoint=run.latest_checkpoint())
            if world > 1 and rank == 0:
                # the supervisor writes the run's one run_failed, naming the rank that failed first
                with EventWriter(rank_events_path(run_dir, 0)) as own:
                    _write_last(own, failed)
            else:
                _write_last(writer, failed)
            return code
        finally:
            run.signals.uninstall()


def _leave_process_group() -> None:
    """Close this rank's process group once its run has ended (finished or stopped).

    Why: a rank that exits with its group still open leaves the backend's threads to the
    interpreter's teardown, which at times aborts the process after the run's clean end ("terminate
    called without an active exception", exit status 134), and the supervisor then read a rank that
    had finished as one that failed.  Only after a clean end: a failed rank's peers may still wait in
    a collective, and closing the group then could hang instead of exiting."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Where transformers reads a checkpoint back: a failure inside these is the checkpoint's, not training's.
_LOADING_FRAMES = frozenset(
    {
        "_load_from_checkpoint",
        "_load_optimizer_and_scheduler",
        "_load_rng_state",
        "_load_scaler",
        "load_from_json",
        "_load_callback_state",
    }
)


def _while_loading(exc: BaseException) -> bool:
    return any(frame.name in _LOADING_FRAMES for frame in traceback.extract_tb(exc.__traceback__))


def _write_last(writer: EventWriter, event) -> None:
    """The terminal record, even on a disk too full for it: then the supervisor records the failure."""
    try:
        writer.write(event)
    except OSError as exc:
        print(f"sftop: could not record the run's end in {writer.path}: {exc}", file=sys.stderr, flush=True)


def _step(run: _Run) -> int | None:
    trainer = run.trainer
    return trainer.state.global_step if trainer is not None else run.step or None
