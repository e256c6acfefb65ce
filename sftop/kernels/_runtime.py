"""Where the Triton kernels can run, decided once per call rather than at import.

Triton picks between its compiler and its CPU interpreter when a kernel is *decorated*, from the
TRITON_INTERPRET environment variable.  So the kernel modules are imported lazily (only once we
know kernels can run), and a process that wants the interpreter must set the variable before the
first kernel module is imported.
"""

from __future__ import annotations

import os


def triton_importable() -> tuple[bool, str]:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install that fails while loading its backends
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    return True, ""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_available() -> tuple[bool, str]:
    """(True, "") when the Triton kernels can run here, else (False, reason)."""
    ok, why = triton_importable()
    if not ok:
        return False, why
    if interpreting():
        return True, ""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU: kernels need a GPU or TRITON_INTERPRET=1"
    return True, ""
