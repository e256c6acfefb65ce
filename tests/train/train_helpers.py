"""Helpers shared by the training tests (fixtures live in conftest.py)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


import pytest

from sftop.engine.events import read_events
from sftop.engine.presets import load_preset

# Small and fast, but the real pipeline: the built-in model, built-in data, TRL, PEFT.
FAST = [
    'train.kernels="off"',
    "train.effective_batch=4",
    "plan.micro_batch=4",
    "plan.grad_accum=1",
    "data.max_length=32",
    "train.warmup_ratio=0.0",
    "train.logging_steps=1",
]


def fast_preset(*overrides):
    preset, _ = load_preset("demo", FAST + list(overrides))
    return preset


def events_of(run_dir: Path) -> list[dict]:
    records, _ = read_events(Path(run_dir) / "events.jsonl")
    return records


def of_type(records, kind):
    return [r for r in records if r["type"] == kind]


def start_trainer(run_dir: Path, overrides: list[str], home: Path) -> subprocess.Popen:
    """The trainer in its own process, as the supervisor runs it (so signals hit it alone)."""
    code = (
        "import sys\n"
        "from sftop.engine.presets import load_preset\n"
        "from sftop.engine.train.runner import run_training\n"
        f"preset, _ = load_preset('demo', {json.dumps(FAST + overrides)})\n"
        f"sys.exit(run_training(preset, {str(run_dir)!r}))\n"
    )
    env = {**os.environ, "SFTOP_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = of_type(events_of(run_dir), "step")
        if len(steps) >= n:
            return steps
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}: {events_of(run_dir)[-3:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {n} step events within {timeout}s")


def in_home(sftop_home):
    """For module-scoped fixtures: the same environment as `home`, for the fixture's body only."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTOP_HOME", str(sftop_home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    return mp


def reference_logps_in_loss(trainer, batch):
    """The mean reference log-probabilities of chosen and rejected that TRL's DPO loss used on
    `batch`: its logged policy log-probs less its rewards / beta (rewards = beta * (policy - reference))."""
    trainer.model.train()
    trainer._metrics["train"].clear()
    trainer.compute_loss(trainer.model, batch)
    if hasattr(trainer, "sftop_metrics"):
        trainer.sftop_metrics.flush(trainer)  # sftop's DPO step reads its metrics when it logs
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return tuple(m[f"logps/{side}"] - m[f"rewards/{side}"] / trainer.beta for side in ("chosen", "rejected"))


def prepared_run(preset, path: Path):
    """A training job resolved and loaded into `path`, ready for `build_trainer()`/`train()`, and its
    event writer (the caller closes it)."""
    from sftop.engine.events import EventWriter
    from sftop.engine.rundir import RunDir
    from sftop.engine.train.runner import _Run

    run_dir = RunDir(path).create()
    writer = EventWriter(run_dir.events)
    run = _Run(preset, run_dir, writer, resume=False)
    run.resolve()
    run.load()
    run.resumed_from = None
    return run, writer


def dpo_trainer(preset, tmp_path, config: dict | None = None, **extra):
    """sftop's DPO trainer on the CPU for a loaded preset (its model and preference data), with
    DPOConfig keys `config` on top of the CPU defaults, and the collated batch of its first 4 pairs."""
    from trl import DPOConfig

    from sftop.engine.data.preference_prepare import prepare_preferences
    from sftop.engine.models.loading import load_model
    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.trainer import UpdateGuard

    model, tokenizer, _ = load_model(preset)
    data = prepare_preferences(preset, tokenizer)
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        **(config or {}),
    )
    trainer = SftopDPOTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        guard=UpdateGuard(3),
        save_total_limit=1,
        **extra,
    )
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    return trainer, batch
