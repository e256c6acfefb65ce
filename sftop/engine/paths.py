"""Where sftop keeps things: user presets (config dir), runs and caches (state/cache dirs).

`SFTOP_HOME` puts everything under one directory; tests use it to stay out of the real home.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "sftop"


def _home() -> Path | None:
    value = os.environ.get("SFTOP_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP))


def state_dir() -> Path:
    home = _home()
    return home / "state" if home else Path(platformdirs.user_state_dir(APP))


def cache_dir() -> Path:
    home = _home()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def user_presets_dir() -> Path:
    return config_dir() / "presets"


def runs_dir() -> Path:
    return state_dir() / "runs"
