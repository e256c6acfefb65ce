"""Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear cross-entropy) and the patches that
put them into Hugging Face models.

Importing this package never imports triton: kernel modules load on first use, after
`kernels_available()` has said they can run, so a CPU-only machine without triton imports it
fine and simply gets the stock path.
"""

from ._runtime import kernels_available
from .patching import PatchReport, patch_model

__all__ = ["PatchReport", "kernels_available", "patch_model"]
