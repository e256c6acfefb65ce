"""Qwen3: GGUF architecture `qwen3`: Qwen2's layout without biases, plus RMSNorm on q and k per head."""

from __future__ import annotations

import gguf
from gguf import MODEL_TENSOR as T

from sftop.engine.export.gguf.families.base import LAYER_TENSORS, Family


class Qwen3(Family):
    arch = gguf.MODEL_ARCH.QWEN3
    model_types = ("qwen3",)
    layer_tensors = {**LAYER_TENSORS, "self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM}
