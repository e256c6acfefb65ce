"""Gemma 3 (the text model; the vision tower of the multimodal ones is refused before this):
GGUF architecture `gemma3`.

As Gemma 2, plus RMSNorm on q and k, no soft-capping, and two rotary bases: one for the sliding
layers (`rope.freq_base_swa`) and one for the global ones.
"""

from __future__ import annotations

import gguf
from gguf import MODEL_TENSOR as T

from sftop.engine.export.gguf.families.base import Family
from sftop.engine.export.gguf.families.gemma2 import GEMMA_LAYER_TENSORS, NORMS, sliding_pattern


class Gemma3(Family):
    arch = gguf.MODEL_ARCH.GEMMA3
    model_types = ("gemma3_text",)
    layer_tensors = {**GEMMA_LAYER_TENSORS, "self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM}
    rope_types_written = ("linear",)

    def _rope(self, config, layer_type: str) -> dict:
        params = config.rope_parameters or {}
        return params.get(layer_type, params)

    def rope_theta(self, config) -> float:
        return float(self._rope(config, "full_attention").get("rope_theta", 1_000_000.0))

    def check_rope_scaling(self, config) -> None:
        for layer_type in ("full_attention", "sliding_attention"):
            kind = self._rope(config, layer_type).get("rope_type", "default")
            if kind not in ("default", "linear"):
                from sftop.engine.errors import SftopError

                raise SftopError(
                    f"Gemma 3 with rope_type `{kind}` cannot be written to GGUF by sftop yet",
                    where="config.json: rope_parameters",
                    hint="Export a merged Hugging Face model instead (`sftop export RUN --merged`)",
                )

    def write_hparams(self, writer, config) -> None:
        super().write_hparams(writer, config)
        writer.add_rope_freq_base_swa(float(self._rope(config, "sliding_attention").get("rope_theta", 10000.0)))
        full = self._rope(config, "full_attention")
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(sliding_pattern(config))
        if getattr(config, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))

    def transform(self, kind, config):
        return (lambda w: w.float() + 1.0) if kind in NORMS else None
