"""Put the Triton kernels into a loaded Hugging Face causal LM, in place, at runtime.

Nothing from HF's modeling files is copied: each part replaces the `forward` of module *instances*
(RMSNorm, MLP, attention, the CausalLM itself) with a small function that calls back into the
original sub-modules (so PEFT's LoRA layers, quantised linears and hooks keep working).  RoPE is
the exception that needs a module-level hook: HF's attention calls the modeling module's global
`apply_rotary_pos_emb`, so that global is replaced once by a dispatcher that uses the kernel only
while a *patched* attention instance is running (a thread-local depth counter set by the
attention wrapper), and otherwise calls HF's original.  Unpatched models in the same process are
therefore unaffected, and gradient-checkpoint recomputation (which re-enters the attention
module's forward) takes the same path as the first forward.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PARTS", "PatchReport", "patch_model"]


def __getattr__(name: str) -> Any:
    # loaded on first use, so that `registry` (names only) imports without torch
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
