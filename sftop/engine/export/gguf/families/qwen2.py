"""Qwen2 / Qwen2.5: GGUF architecture `qwen2`.

llama.cpp rotates halves of each head for Qwen (its "NEOX" rope), exactly as Hugging Face does,
so q and k are written as they are; the q/k/v biases go along as `.bias` tensors.
"""

from __future__ import annotations

import gguf

from sftop.engine.export.gguf.families.base import Family


class Qwen2(Family):
    arch = gguf.MODEL_ARCH.QWEN2
    model_types = ("qwen2",)
