"""Presets: the typed schema, and reading/overriding/writing TOML files."""

from sftop.engine.presets.loader import (
    PresetInfo,
    list_presets,
    load_preset,
    parse_override,
    save_preset,
    save_user_preset,
    to_toml,
    validate,
)
from sftop.engine.presets.schema import Preset

__all__ = [
    "Preset",
    "PresetInfo",
    "list_presets",
    "load_preset",
    "parse_override",
    "save_preset",
    "save_user_preset",
    "to_toml",
    "validate",
]
