"""Put the Triton kernels into a loaded Hugging Face causal LM, in place, at runtime.

Nothing from HF's modeling files is copied: each part (one module under `parts/`) replaces the
`forward` of module *instances* (RMSNorm, MLP, attention, the CausalLM itself) with a small
function that calls back into the original sub-modules (so PEFT's LoRA layers, quantised linears
and hooks keep working).  RoPE is the exception that needs a module-level hook (`parts/rope.py`).
What a part leaves on a module is named in `markers.py`; the order the parts run in comes from
their declared requirements (`part.py`); `core.py` runs them and takes them off again.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PARTS", "PatchReport", "patch_model", "unpatch"]


def __getattr__(name: str) -> Any:
    # loaded on first use, so that `registry` (names only) imports without torch
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
