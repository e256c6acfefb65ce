"""Llama (and sftop's built-in demo model, which is a Llama): GGUF architecture `llama`.

llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3)... where Hugging Face's
Llama rotates the two halves of each head. The same rotation holds once the rows of q_proj and
k_proj are reordered per head from [half A | half B] to [a0, b0, a1, b1, ...], so those two are
permuted on the way out. Llama 3's long-context rope scaling is written as llama.cpp's
`rope_freqs` tensor: one divisor per rotary frequency.
"""

from __future__ import annotations

import math

import gguf
import torch
from gguf import MODEL_TENSOR as T

from sftop.engine.export.gguf.families.base import Family, PlannedTensor


def interleave_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first half | second half] to alternating pairs."""
    shape = weight.shape
    half = shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *shape[1:]).transpose(1, 2).reshape(shape)


def llama3_rope_divisors(config, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3's rope scaling: long wavelengths slowed by `factor`,
    short ones untouched, a smooth blend in between."""
    params = config.rope_parameters
    theta = float(params["rope_theta"])
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


class Llama(Family):
    arch = gguf.MODEL_ARCH.LLAMA
    model_types = ("llama",)
    rope_types_written = ("llama3", "linear")

    def write_hparams(self, writer, config) -> None:
        super().write_hparams(writer, config)
        params = getattr(config, "rope_parameters", None) or {}
        if params.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(params["factor"]))

    def transform(self, kind, config):
        if kind is T.ATTN_Q:
            return lambda w: interleave_heads(w, config.num_attention_heads)
        if kind is T.ATTN_K:
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            return lambda w: interleave_heads(w, heads)
        return None

    def extra_tensors(self, config) -> list[PlannedTensor]:
        params = getattr(config, "rope_parameters", None) or {}
        if params.get("rope_type") != "llama3":
            return []
        divisors = llama3_rope_divisors(config, self.head_dim(config))
        return [PlannedTensor(self.tensor_name(T.ROPE_FREQS) + ".weight", divisors)]
