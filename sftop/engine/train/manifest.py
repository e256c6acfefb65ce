"""`manifest.json`: what a complete checkpoint holds, written as the last file of every save.

Each file of the checkpoint is listed with its size and SHA-256. A checkpoint is resumed from only
when its manifest exists and every file still matches it: a file cut short by a full disk, a
flipped byte on a failing volume or a file replaced by hand is caught before anything is loaded,
and the resume falls back to the next older checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(path: Path) -> Path:
    """List every file under `path` with size and checksum; fsync'd, so it is written last and durably."""
    files = {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(path)}
    target = path / MANIFEST
    with open(target, "w", encoding="utf-8") as fh:
        json.dump({"version": MANIFEST_VERSION, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return target


def verify_checkpoint(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """None when the checkpoint matches its manifest; otherwise why it cannot be trusted."""
    manifest = path / MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a table")
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save never finished)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({type(exc).__name__})"
    for name in required:
        if name not in files:
            return f"its manifest does not list {name}"
    for name, entry in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry.get("size"):
            return f"{name} is {size} bytes, the manifest says {entry.get('size')}"
        try:
            digest = _sha256(file)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if digest != entry.get("sha256"):
            return f"{name} does not match its checksum (the file was changed or damaged)"
    return None
