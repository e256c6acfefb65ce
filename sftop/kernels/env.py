"""The `SFTOP_*` switches read from the environment, parsed one way (docs/configuration.md).

Importing this module imports only the standard library, so the planner and the CLI can use it.
"""

from __future__ import annotations

import os
from typing import Mapping

ON = ("1", "true", "on", "yes")
OFF = ("0", "false", "off", "no")


def env_choice(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """True or False when `name` is set to one of ON or OFF (any case), None when unset or empty.

    Any other value is an error rather than a silent default: a typo in a switch that changes how
    a run trains should not go unnoticed.
    """
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if not value:
        return None
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(
        f"{name}={value!r} is not a switch value: set it to one of {', '.join(ON)} (on) "
        f"or {', '.join(OFF)} (off), or unset it for the default"
    )


def env_flag(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """`env_choice`, with `default` when the variable is unset."""
    choice = env_choice(name, environ)
    return default if choice is None else choice
