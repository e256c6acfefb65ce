"""What every benchmark script writes the same way: the result header (machine, versions, date,
command), a timed `trainer.train()` of a Trainer row, and a path's line when it did not measure."""

from __future__ import annotations

import sys
import time
from typing import Any

import unsloth_peer


def result_header(device: str, *packages: str) -> dict[str, Any]:
    """The facts every result file starts with: the device, torch and the named packages' versions,
    the date (UTC) and the command that produced it."""
    import importlib

    import torch

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for name in packages:
        out[name] = importlib.import_module(name).__version__
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["command"] = " ".join(sys.argv)
    return out


def timed_train(trainer) -> dict[str, Any]:
    """`trainer.train()` timed, with the peak allocated GPU memory over it (None on a CPU): the
    training time, the Trainer's own runtime, the optimizer steps and the mean training loss."""
    import torch

    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    return {
        "train_s": train_s,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "steps": trainer.state.global_step,
        "final_loss": result.training_loss,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
    }


def unmeasured_line(r: dict, width: int) -> str | None:
    """A path's result line when it measured nothing: the peer could not be imported, or the path
    failed (with the last line of its error); None when it measured."""
    if "unavailable" in r:
        return f"  {r['path']:{width}s} {unsloth_peer.not_measured(r['unavailable'])}"
    if "tokens_per_s" in r:
        return None
    last = [ln for ln in str(r.get("error", "")).splitlines() if ln.strip()][-1:]
    return f"  {r['path']:{width}s} FAILED" + (f": {last[0][:300]}" if last else "")
