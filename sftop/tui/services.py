"""What the app reads from the world, injectable so tests and snapshots are deterministic."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from sftop.engine.gpu import GpuStatus, read_gpus


@dataclass
class Services:
    gpu_reader: Callable[[], GpuStatus] = read_gpus  # never raises: no GPU comes with a reason
    clock: Callable[[], float] = time.time
    # Seconds between GPU samples and event polls; tests shorten them.
    gpu_interval: float = 1.0
    poll_interval: float = 0.25
    # The dashboard redraws charts at most this often (seconds).
    redraw_interval: float = 0.5
    # The Hugging Face cache to list models from (None: the hub library's default, HF_HUB_CACHE).
    hf_cache_dir: str | None = None
