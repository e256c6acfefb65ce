"""Gemma 2: GGUF architecture `gemma2`.

Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's multiplies by the weight, so every norm is
written with 1 added. Each block has four norms (before and after attention and MLP). Logit soft-capping
and the sliding window (on alternate layers) are stated as metadata.
"""

from __future__ import annotations

import gguf
from gguf import MODEL_TENSOR as T

from sftop.engine.export.gguf.families.base import LAYER_TENSORS, Family

NORMS = (T.ATTN_NORM, T.ATTN_POST_NORM, T.FFN_PRE_NORM, T.FFN_POST_NORM, T.OUTPUT_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM)

GEMMA_LAYER_TENSORS = {
    **LAYER_TENSORS,
    "post_attention_layernorm": T.ATTN_POST_NORM,
    "pre_feedforward_layernorm": T.FFN_PRE_NORM,
    "post_feedforward_layernorm": T.FFN_POST_NORM,
}


def sliding_pattern(config) -> list[bool]:
    return [kind == "sliding_attention" for kind in config.layer_types]


class Gemma2(Family):
    arch = gguf.MODEL_ARCH.GEMMA2
    model_types = ("gemma2",)
    layer_tensors = GEMMA_LAYER_TENSORS

    def write_hparams(self, writer, config) -> None:
        super().write_hparams(writer, config)
        if config.attn_logit_softcapping is not None:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(sliding_pattern(config))

    def transform(self, kind, config):
        return (lambda w: w.float() + 1.0) if kind in NORMS else None
