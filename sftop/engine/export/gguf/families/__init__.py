"""The model families sftop writes to GGUF, one module each; `family_for` picks by `model_type`."""

from __future__ import annotations

from sftop.engine.errors import SftopError
from sftop.engine.export.gguf.families.base import Family, PlannedTensor
from sftop.engine.export.gguf.families.gemma2 import Gemma2
from sftop.engine.export.gguf.families.gemma3 import Gemma3
from sftop.engine.export.gguf.families.llama import Llama
from sftop.engine.export.gguf.families.mistral import Mistral
from sftop.engine.export.gguf.families.qwen2 import Qwen2
from sftop.engine.export.gguf.families.qwen3 import Qwen3

FAMILIES: tuple[Family, ...] = (Llama(), Mistral(), Qwen2(), Qwen3(), Gemma2(), Gemma3())
BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_for(config) -> Family:
    """The family for a model's config, or an error naming what is supported (before any work)."""
    model_type = getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is not None:
        return family
    supported = ", ".join(sorted(BY_MODEL_TYPE))
    if getattr(config, "vision_config", None) is not None or hasattr(config, "text_config"):
        what = f"`{model_type}` is a vision-language model; GGUF export writes text-only models"
        hint = (
            "llama.cpp keeps a VLM's vision tower in a separate projector file that sftop does not write; "
            "export the merged Hugging Face model instead (`sftop export RUN --merged`)"
        )
    else:
        what = f"sftop cannot write `{model_type}` models to GGUF"
        hint = "Export the merged Hugging Face model instead (`sftop export RUN --merged`)"
    raise SftopError(f"{what} (GGUF export supports: {supported})", where="config.json: model_type", hint=hint)


__all__ = ["FAMILIES", "Family", "PlannedTensor", "family_for"]
