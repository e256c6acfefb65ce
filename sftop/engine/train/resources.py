"""Check free disk space before a run starts, so a full disk never eats hours of GPU time."""

from __future__ import annotations

import shutil
from pathlib import Path

from sftop.engine.errors import ResourceError

GIB = 1024**3


def expected_disk_bytes(
    *, trainable_params: int, total_params: int, save_total_limit: int, bytes_per_param_export: int = 2
) -> dict[str, int]:
    """Bytes a run writes: checkpoints (adapter fp32 + AdamW's two fp32 moments), the final adapter,
    and a merged export of the whole model in 16-bit. Kept as a breakdown for the error message."""
    adapter = trainable_params * 4
    optimizer = trainable_params * 4 * 2
    checkpoints = (adapter + optimizer) * (save_total_limit + 1)  # +1: the new one lands before the oldest goes
    return {
        "checkpoints": checkpoints,
        "final adapter": adapter,
        "merged export": total_params * bytes_per_param_export,
    }


def check_disk_space(path: Path, needs: dict[str, int], *, margin: float = 1.1) -> int:
    """Raise ResourceError when `path`'s file system has less free space than `needs` (+10%)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(sum(needs.values()) * margin)
    if free < need:
        parts = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in needs.items())
        raise ResourceError(
            f"Not enough free disk space for this run: {need / GIB:.2f} GiB needed ({parts}, plus 10%), "
            f"{free / GIB:.2f} GiB free",
            where=str(probe),
            hint="Free some space, lower train.save_total_limit, or put runs on a bigger disk with SFTOP_HOME=/path",
        )
    return free
