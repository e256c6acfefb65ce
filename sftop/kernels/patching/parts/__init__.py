"""The registered patch parts, one module each.  A new part is a new module here holding
`PART = Part(...)` (sftop/kernels/patching/part.py) and one line in `REGISTERED`; the run order
comes from the parts' `requires`, registration order breaking ties."""

from __future__ import annotations

from ..part import Part, resolve_order
from . import (
    attention,
    attention_lora,
    checkpoint_offload,
    cuda_graphs,
    kept_projections,
    lean_recompute,
    lora,
    loss,
    mlp,
    rms_norm,
    rope,
)

REGISTERED: tuple[Part, ...] = (
    rms_norm.PART,
    rope.PART,
    mlp.PART,
    lora.PART,
    attention_lora.PART,
    attention.PART,
    loss.PART,
    lean_recompute.PART,
    checkpoint_offload.PART,
    kept_projections.PART,
    cuda_graphs.PART,
)

ORDER: tuple[Part, ...] = resolve_order(REGISTERED)
