"""Training: TRL's SFTTrainer with sftop's events, atomic checkpoints, clean stops and memory safety.

Entry point: `run_training(preset, run_dir, resume=False) -> exit code` (the job behind `sftop run`).
"""

from sftop.engine.train.runner import run_training

__all__ = ["run_training"]
