"""Mistral: llama.cpp runs it as a Llama (GGUF architecture `llama`), with its sliding window.

Only Mistral models without a sliding window (v0.2 and later) or with one longer than any context
they are run at behave the same in llama.cpp, which has no sliding window for `llama`; a model that
depends on its window is refused rather than written into a file that would read differently.
"""

from __future__ import annotations

from sftop.engine.errors import SftopError
from sftop.engine.export.gguf.families.llama import Llama


class Mistral(Llama):
    model_types = ("mistral",)

    def write_hparams(self, writer, config) -> None:
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise SftopError(
                f"This Mistral model attends over a sliding window of {window} tokens, shorter than its "
                f"context of {config.max_position_embeddings}; llama.cpp's `llama` architecture has no "
                "sliding window, so the GGUF file would not behave like the model",
                where="config.json: sliding_window",
                hint="Export a merged Hugging Face model instead (`sftop export RUN --merged`)",
            )
        super().write_hparams(writer, config)
