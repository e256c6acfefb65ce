"""A full disk, said as such: "disk full at PATH, N bytes needed", never a traceback.

Writers fail in several ways when the disk fills: OSError with ENOSPC or EDQUOT from Python's own
files, and RuntimeError from torch's zip writer ("file write failed"). `is_disk_full` recognises
them all; `DiskFullError` is the one-paragraph error the run records as `run_failed`.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from sftop.engine.errors import ResourceError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file write failed")


class DiskFullError(ResourceError):
    def __init__(self, path: Path | str, needed: int | None):
        need = f", {needed} bytes needed" if needed else ""
        super().__init__(
            f"disk full at {path}{need}",
            where=str(path),
            hint="Free some space on that disk (older runs, caches), then `sftop resume` the run: "
            "its previous checkpoint is intact",
        )
        self.path = Path(path)
        self.needed = needed


def is_disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        # torch's zip writer and safetensors raise their own types, with the OS's words inside.
        text = str(exc).lower()
        if any(t in text for t in _FULL_TEXT):
            return True
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            return False
        exc = nxt
    return False


def free_bytes(path: Path) -> int | None:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def tree_bytes(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total
