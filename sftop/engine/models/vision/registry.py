"""Every vision-language family sftop knows, keyed by name and by HF `model_type`.

Adding a family: a new module under `families/` with a `FAMILY` instance, and one line here.
"""

from __future__ import annotations

from typing import Any

from sftop.engine.models.vision.family import VisionFamily

# module names under sftop.engine.models.vision.families, one line per family
FAMILY_MODULES: tuple[str, ...] = (
    "qwen2_vl",
    "gemma3",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "llava",
    "llava_next",
    "qwen3_vl",
    "mllama",
)


def all_families() -> dict[str, VisionFamily]:
    import importlib

    families: dict[str, VisionFamily] = {}
    for module in FAMILY_MODULES:
        family = importlib.import_module(f"sftop.engine.models.vision.families.{module}").FAMILY
        families[family.name] = family
    return families


def family_for_model_type(model_type: str) -> VisionFamily | None:
    for family in all_families().values():
        if model_type in family.model_types:
            return family
    return None


def family_for_config(config: Any) -> VisionFamily | None:
    """The family of a loaded HF config, or None for a text-only model."""
    return family_for_model_type(getattr(config, "model_type", ""))
