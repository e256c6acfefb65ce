"""Tell a vision-language model from its config.json on disk, without the network or weights.

For the TUI's model step and `sftop presets show`: a built-in, a local directory, or a hub id
whose config is in the local Hugging Face cache. Anything else is "not known yet" (None), never
an error: the run itself reads the config and decides.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftop.engine.models.vision.family import VisionFamily


def _config_path(name: str, cache_dir: str | None) -> Path | None:
    path = Path(name).expanduser()
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    if "/" not in name or name.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a malformed id or unreadable cache: not known
        return None
    return Path(found) if isinstance(found, str) else None


def family_on_disk(name: str, cache_dir: str | None = None) -> VisionFamily | None:
    """The VLM family of model `name` from its config.json on disk; None for text or unknown models."""
    from sftop.engine.models.demo_vlm import DEMO_VLM_NAME, demo_family
    from sftop.engine.models.vision.registry import family_for_model_type

    if name == DEMO_VLM_NAME:
        return demo_family()
    if name.startswith("builtin:"):
        return None
    path = _config_path(name, cache_dir)
    if path is None:
        return None
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return None
    return family_for_model_type(str(model_type))
