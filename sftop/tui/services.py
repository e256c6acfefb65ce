"""What the app reads from the world, injectable so tests and snapshots are deterministic."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


def read_gpu_status() -> Any:
    """The planner engineer's GPU reading, or a reason why there is none (never raises)."""
    try:
        from sftop.engine.gpu import read_gpus
    except Exception as exc:  # the GPU module is missing or broken: say so instead of crashing
        return f"GPU info unavailable ({exc})"
    try:
        return read_gpus()
    except Exception as exc:
        return f"GPU info unavailable ({exc})"


@dataclass
class Services:
    gpu_reader: Callable[[], Any] = read_gpu_status
    clock: Callable[[], float] = time.time
    # Seconds between GPU samples and event polls; tests shorten them.
    gpu_interval: float = 1.0
    poll_interval: float = 0.25
    # The dashboard redraws charts at most this often (seconds).
    redraw_interval: float = 0.5
    # The Hugging Face cache to list models from (None: the hub library's default, HF_HUB_CACHE).
    hf_cache_dir: str | None = None
