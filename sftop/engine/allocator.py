"""The CUDA caching allocator's settings for a training process.

sftop trains with expandable segments: the allocator grows one mapped segment instead of caching
blocks of fixed sizes, so memory reserved stays close to memory allocated while a step's tensors
change size (packed micro-batches of varying tokens, length buckets). Without them reserved memory
ran 4-23 % above allocated, and a run held to `plan.max_memory_gib` (which bounds what the
allocator may reserve, through torch.cuda.set_per_process_memory_fraction) could run out of memory
at a peak the planner said fits; the planner's allocator margin (planner/estimate.py
ALLOCATOR_MARGIN) assumes them.

A user's own allocator settings win: where either variable below is set, sftop adds nothing.
`PYTORCH_CUDA_ALLOC_CONF` is the name sftop writes because torch 2.8-2.11 read expandable segments
for CUDA only from it (the newer `PYTORCH_ALLOC_CONF` was ignored for them there). The variable is
read when CUDA initialises, so it goes into the trainer's environment before that: the supervisor's
child environment, and the start of the training job for foreground runs.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping

WRITTEN_ENV = "PYTORCH_CUDA_ALLOC_CONF"
USER_ENVS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
SETTING = "expandable_segments:True"


def allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What to add to a training process's environment: nothing where the user chose settings."""
    if any(environ.get(name) for name in USER_ENVS):
        return {}
    return {WRITTEN_ENV: SETTING}


def configure_allocator(environ: MutableMapping[str, str] | None = None) -> None:
    """Set sftop's allocator settings in `environ` (os.environ) unless the user set theirs."""
    environ = os.environ if environ is None else environ
    environ.update(allocator_env(environ))


def allocator_settings(environ: Mapping[str, str] | None = None) -> str:
    """The allocator settings a process runs with, as run_started.environment records them."""
    environ = os.environ if environ is None else environ
    for name in USER_ENVS:
        if environ.get(name):
            return f"{name}={environ[name]}"
    return "torch defaults"
