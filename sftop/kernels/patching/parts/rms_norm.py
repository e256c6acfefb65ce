"""Part rms_norm: every `<Family>RMSNorm` instance runs the RMSNorm kernel (sftop/kernels/rms_norm.py)."""

from __future__ import annotations

import torch
from torch import nn

from ...checkpoint_offload import fetch_deferred
from ..forwards import FUSED, family_modules, quantised_compute_dtype, set_forward
from ..part import Part
from ..registry import FamilySpec


def before_backward(dy: torch.Tensor) -> None:
    """Called as a patched norm's backward starts.  In a decoder layer that is the post-attention
    norm right after the MLP backward has freed its buffers (the layer's peak): offloaded q/k/v held
    back for it (part kept_projections) may be fetched now."""
    if dy.is_cuda:
        fetch_deferred()


def apply(model: nn.Module, spec: FamilySpec) -> str:
    from ...rms_norm import rms_norm

    mods = family_modules(model, spec, spec.norm_class)
    if not mods:
        return f"stock: no {spec.norm_class} modules found"
    gemma = spec.gemma_norm
    # prepare_model_for_kbit_training leaves norms (and so the residual stream) in fp32; HF then
    # hands fp32 activations to every consumer, which runs SDPA on its fp32 math path (full
    # [T, T] scores) and the LoRA GEMMs without tensor cores.  The quantised linears cast their
    # input to the compute dtype anyway, so on k-bit models the norms emit that dtype; the
    # residual stream itself stays fp32.
    out_dtype = quantised_compute_dtype(model)

    def forward(self, _orig, x):
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = self.eps
        return rms_norm(x, self.weight, eps, gemma, out_dtype, before_backward)

    for m in mods:
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            return f"stock: {spec.norm_class} without a weight tensor"
    for m in mods:
        set_forward(m, forward, "rms_norm")
    return FUSED


PART = Part("rms_norm", apply)
