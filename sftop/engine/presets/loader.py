"""Find, read, override, validate and write presets.

A preset is named by a built-in name (`sftop/presets/*.toml`), a user preset name (config dir),
or a path to a `.toml` file. Validation errors name the file, the key and a likely fix.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from sftop.engine.errors import PresetError
from sftop.engine.paths import user_presets_dir
from sftop.engine.presets.schema import SECTIONS, Preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class PresetInfo:
    name: str
    origin: str  # "built-in", "user" or "file"
    path: Path
    description: str


def builtin_dir() -> Path:
    return Path(str(resources.files("sftop.presets")))


def _candidates() -> dict[str, PresetInfo]:
    found: dict[str, PresetInfo] = {}
    for origin, folder in (("built-in", builtin_dir()), ("user", user_presets_dir())):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            try:
                description = str(_read_toml(path).get("description", ""))
            except PresetError:
                description = "(unreadable)"
            # A user preset may shadow a built-in one of the same name on purpose.
            found[path.stem] = PresetInfo(path.stem, origin, path, description)
    return found


def list_presets() -> list[PresetInfo]:
    return sorted(_candidates().values(), key=lambda p: (p.origin != "built-in", p.name))


def resolve_path(ref: str | Path) -> Path:
    """Turn a preset reference (name or path) into the file it names."""
    text = str(ref)
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise PresetError(
                f"Preset file {path} does not exist",
                hint="Check the path, or run `sftop presets list` to see preset names",
            )
        return path
    if path.is_dir() and (path / "preset.toml").is_file():
        return path / "preset.toml"  # a run directory: repeat that run
    known = _candidates()
    if text in known:
        return known[text].path
    close = difflib.get_close_matches(text, list(known), n=1)
    hint = f"Did you mean `{close[0]}`? " if close else ""
    raise PresetError(
        f"No preset named `{text}`",
        hint=hint + "Run `sftop presets list` to see the built-in and saved presets, or pass a path to a .toml file",
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(
            f"{path} is not valid TOML ({exc})",
            where=str(path),
            hint='Fix the syntax; strings need quotes, e.g. name = "my-run"',
        ) from None
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data.count(b"\n", 0, exc.start) + 1
        raise PresetError(
            f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) cannot be decoded",
            where=f"{path}, line {line}",
            hint="Save the preset as UTF-8 (TOML files must be UTF-8; `iconv -t UTF-8` can convert it), "
            "or move it out of the presets directory",
        ) from None
    except OSError as exc:
        raise PresetError(f"Cannot read {path}: {exc.strerror}", where=str(path)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (["train", "max_steps"], 20). Values use TOML syntax; bare words are strings."""
    if "=" not in text:
        raise PresetError(
            f"`--set {text}` has no value", hint="Write it as SECTION.KEY=VALUE, e.g. --set train.max_steps=20"
        )
    key, _, raw = text.partition("=")
    keys = [k.strip() for k in key.strip().split(".") if k.strip()]
    if not keys:
        raise PresetError(
            f"`--set {text}` has no key", hint="Write it as SECTION.KEY=VALUE, e.g. --set train.max_steps=20"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as an id or path: treat as a string
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise PresetError(f"`--set {text}`: `{k}` is not a section", hint="Sections are " + ", ".join(SECTIONS))
        node[keys[-1]] = value
    return data


def _suggest(loc: tuple, bad_key: str) -> str:
    if len(loc) <= 1:
        names = list(SECTIONS) + ["name", "description"]
    else:
        section = SECTIONS.get(str(loc[0]))
        names = list(section.model_fields) if section else []
    close = difflib.get_close_matches(bad_key, names, n=1, cutoff=0.5)
    if close:
        prefix = ".".join(str(p) for p in loc[:-1])
        return f"did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    return "valid keys here: " + ", ".join(names)


def _explain(exc: ValidationError, source: str) -> PresetError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # Union members add their type name to the location; drop those so the key reads as in the file.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "str", "list"))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key `{key}` ({_suggest(loc, str(loc[-1]))})")
        elif err["type"] == "string_pattern_mismatch" and loc == ("name",):
            lines.append(
                f"`name` may hold only letters, digits, '_', '.' and '-', and must start with a letter "
                f"or digit (got {err.get('input')!r})"
            )
        else:
            got = err.get("input")
            msg = err["msg"]
            # Only the first letter is lowered: the rest may quote a value or pattern the user must match.
            lines.append(f"`{key}` {msg[:1].lower() + msg[1:]} (got {got!r})")
    # Unique, in order: union types can repeat one complaint per member.
    lines = list(dict.fromkeys(lines))
    return PresetError(
        "Invalid preset: " + "; ".join(lines),
        where=source,
        hint="Fix the key in the file or in --set; `sftop presets show demo` prints every key with its default",
    )


def validate(data: dict[str, Any], source: str) -> Preset:
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def load_preset(ref: str | Path, overrides: list[str] | None = None) -> tuple[Preset, Path]:
    """Read and validate a preset; `overrides` are `SECTION.KEY=VALUE` strings applied on top."""
    path = resolve_path(ref)
    data = _read_toml(path)
    data.setdefault("name", path.stem if path.name != "preset.toml" else path.parent.name)
    source = str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")
    return validate(apply_overrides(data, overrides or []), source), path


def to_toml(preset: Preset) -> str:
    """Every key with its resolved value (None is left out: TOML has no null)."""
    return tomli_w.dumps(preset.model_dump(mode="json", exclude_none=True))


def save_preset(preset: Preset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    text = to_toml(preset)
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written copy behind
        from sftop.engine.diskfull import DiskFullError, is_disk_full

        if is_disk_full(exc):
            raise DiskFullError(path.parent, len(text.encode())) from None
        raise
    return path


def save_user_preset(preset: Preset, name: str | None = None) -> Path:
    name = name or preset.name
    return save_preset(preset.model_copy(update={"name": name}), user_presets_dir() / f"{name}.toml")
