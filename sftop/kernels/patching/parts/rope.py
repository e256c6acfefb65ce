"""Part rope: HF's attention calls its modeling module's global `apply_rotary_pos_emb`; that global
is replaced once by a dispatcher that runs the RoPE kernel (sftop/kernels/rope.py) only while a
*patched* attention instance runs (a thread-local depth its forward wrapper counts), and HF's
original otherwise.  Unpatched models in the same process are therefore unaffected, and a
checkpoint's recomputation (which re-enters the attention's forward) takes the first run's path."""

from __future__ import annotations

import importlib
import threading

from torch import nn

from ... import compat
from .. import markers as M
from ..forwards import FUSED, family_modules, set_forward
from ..part import Part
from ..registry import FamilySpec

_state = threading.local()


def rope_active() -> bool:
    """True inside the forward of an attention instance this part patched (this thread)."""
    return getattr(_state, "depth", 0) > 0


def _install_dispatcher(modeling) -> None:
    original = compat.rope_function(modeling)
    if getattr(original, M.ROPE_DISPATCHER, False):
        return
    from ...recompute import is_placeholder, rope_on_placeholders
    from ...rope import apply_rope, rope_supported

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args and isinstance(args[-1], int) else 1)
        if rope_active() and unsqueeze_dim in (1, 2):
            qq, kk = (q, k) if unsqueeze_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
            if rope_supported(qq, kk, cos, sin):
                if is_placeholder(q) and is_placeholder(k):
                    # a recomputation whose attention takes the first run's rotated q/k back
                    # (part kept_projections): only the backward's rotation is needed
                    return rope_on_placeholders(q, k, cos, sin, unsqueeze_dim)
                return apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, M.ROPE_DISPATCHER, True)
    setattr(apply_rotary_pos_emb, M.ROPE_ORIGINAL, original)
    compat.set_rope_function(modeling, apply_rotary_pos_emb)


def _forward(self, orig, *args, **kwargs):
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        return orig(*args, **kwargs)
    finally:
        _state.depth -= 1


def apply(model: nn.Module, spec: FamilySpec) -> str:
    try:
        modeling = importlib.import_module(spec.modeling_module)
    except ImportError as exc:
        return f"stock: {spec.modeling_module} not importable ({exc})"
    if compat.rope_function(modeling) is None:
        return f"stock: {spec.modeling_module} has no {compat.ROPE_FUNCTION}"
    mods = family_modules(model, spec, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    _install_dispatcher(modeling)
    for m in mods:
        set_forward(m, _forward, "rope")
    return FUSED


# the dispatcher stays installed after unpatch: it calls HF's original for every attention that is
# not patched, and other patched models in the process may still use it
PART = Part("rope", apply, provides=(M.PART,))
