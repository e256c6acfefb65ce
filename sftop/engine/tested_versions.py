"""The package versions sftop's test suite runs against, and which installed ones differ.

The list is the project's top-level `constraints.txt`, shipped inside the package as
`sftop/tested_versions.txt` so that an installed sftop (no source tree) still knows it.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

# sftop's direct dependencies: a drift in one of these is worth a warning. Transitive packages
# (aiohttp, numpy, ...) are pinned for reproducible installs but rarely break sftop themselves.
DIRECT = (
    "torch",
    "triton",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "huggingface-hub",
    "bitsandbytes",
    "tokenizers",
    "safetensors",
    "textual",
    "pydantic",
    "nvidia-ml-py",
    "pillow",
    "platformdirs",
)

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    """PEP 503 name: `huggingface_hub` and `Huggingface-Hub` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_path() -> Path:
    return Path(str(resources.files("sftop") / "tested_versions.txt"))


def parse_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a pip constraints file, by normalised name."""
    pins = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def tested_versions() -> dict[str, str]:
    return parse_pins(constraints_path().read_text(encoding="utf-8"))


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Drift:
    package: str
    installed: str
    tested: str

    @property
    def newer(self) -> bool:
        from packaging.version import Version

        return Version(self.installed) > Version(self.tested)

    def __str__(self) -> str:
        return f"{self.package} {self.installed} (tested: {self.tested})"


def _public(version: str) -> str:
    # torch's `2.13.0+cpu` and `2.13.0+cu128` are the tested 2.13.0: the local label is the build.
    return version.split("+", 1)[0]


def version_drift(
    installed: Callable[[str], str | None] | None = None, pins: dict[str, str] | None = None
) -> list[Drift]:
    """Direct dependencies whose installed version is not the tested one (missing ones are skipped)."""
    pins = tested_versions() if pins is None else pins
    installed = installed or _installed
    drift = []
    for name in DIRECT:
        tested = pins.get(name)
        version = installed(name)
        if tested is None or version is None:
            continue
        if _public(version) != tested:
            drift.append(Drift(name, version, tested))
    return drift
