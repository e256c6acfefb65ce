"""Tensor encodings: how each weight is stored for the file type the user asked for.

Matrices take the asked-for type; vectors (norms, biases, rope divisors) stay float32 as llama.cpp
expects. q8_0 packs rows in blocks of 32 values (one scale and 32 int8 each); a matrix whose rows
are not a multiple of 32 long cannot be packed and is stored as f16 instead.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

FILE_TYPES = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
Q8_BLOCK = 32


def storage_type(shape: tuple[int, ...], kind: str) -> Q:
    if len(shape) < 2:
        return Q.F32
    if kind == "q8_0":
        return Q.Q8_0 if shape[-1] % Q8_BLOCK == 0 else Q.F16
    return Q.BF16 if kind == "bf16" else Q.F16


def stored_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    if qtype is Q.F32:
        return int(np.prod(shape)) * 4
    if qtype is Q.F16:
        return int(np.prod(shape)) * 2
    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


def encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """The bytes of `tensor` in `qtype`: float arrays for F32/F16, uint8 arrays for packed types."""
    if qtype is Q.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype is Q.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype is Q.BF16:
        raw = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(quant_shape_to_byte_shape(tuple(tensor.shape), qtype))
    return quantize(tensor.to(torch.float32).contiguous().numpy(), qtype)
