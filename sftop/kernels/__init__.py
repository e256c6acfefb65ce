"""Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear cross-entropy) and the patches that
put them into Hugging Face models.

Importing this package imports neither torch nor triton: `patch_model` and the kernel modules load
on first use, after `kernels_available()` has said they can run, so a CPU-only machine without
triton imports it fine and simply gets the stock path, and the planner can read
`sftop.kernels.constants` without torch.
"""

from __future__ import annotations

from typing import Any

from ._runtime import kernels_available

__all__ = ["PatchReport", "kernels_available", "patch_model", "unpatch"]


def __getattr__(name: str) -> Any:
    if name in ("PatchReport", "patch_model", "unpatch"):
        from . import patching

        return getattr(patching, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
