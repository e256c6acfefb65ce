"""What a resume may change, and when there is nothing to resume: checked before anything is written.

A resume continues the same adapter on the same rows in the same order, so the model, the LoRA
shape, the data (and how it is split and ordered) and the task are fixed for a run's life; step
counts, checkpointing, logging and the micro-batch plan may change. A finished run is not trained
past its end unless the resume asks for more steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftop.engine.errors import PresetError
from sftop.engine.events import TERMINAL_TYPES, read_events
from sftop.engine.presets.loader import tomllib  # tomli on Python 3.10
from sftop.engine.rundir import RunDir

FROZEN_SECTIONS = ("model", "lora", "data")
# Inside a frozen section: what only steers how bad data is tolerated or how rows are batched, not
# which rows are trained. A run records packing off where its model cannot pack (a VLM, attention
# that leaks across packed rows); a resume of the user's own preset then decides the same again.
CHANGEABLE_IN_FROZEN = {"data.max_bad_fraction", "data.packing"}
# train.equal_token_steps decides which rows each optimizer step holds, as the seed does: changed
# mid-epoch, the resumed steps would train some rows twice and skip others.
FROZEN_TRAIN_KEYS = {"train.seed", "train.effective_batch", "train.equal_token_steps"}
FREE_TOP_LEVEL = {"name", "description", "train", "plan"}
FROZEN_TEXT = (
    "the model, lora and data sections (data.max_bad_fraction and data.packing excepted), train.seed, "
    "train.effective_batch, train.equal_token_steps and the task"
)
# Frozen keys newer than some recorded runs, with what a run whose preset.toml lacks one trained
# with: its resume keeps that, whatever the preset it resumes with says (runner.keep_predated_keys),
# so they are not compared.
RECORDED_BEFORE_KEY: dict[str, str] = {"train.equal_token_steps": "off"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _frozen(key: str) -> bool:
    top = key.split(".", 1)[0]
    if key in CHANGEABLE_IN_FROZEN:
        return False
    if top in FROZEN_SECTIONS or key in FROZEN_TRAIN_KEYS:
        return True
    return top not in FREE_TOP_LEVEL  # a task or any other top-level choice of what is trained


def incompatible_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key old -> new` for each key that a resume cannot change. "auto" matches what it resolved to;
    a key the run's preset predates is kept as the run trained (RECORDED_BEFORE_KEY), not compared."""
    before, after = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b or not _frozen(key) or b == "auto" or (key in RECORDED_BEFORE_KEY and key not in before):
            continue
        changes.append(f"`{key}` {a!r} -> {b!r}")
    return changes


def _read_original(run: RunDir) -> dict[str, Any] | None:
    try:
        return tomllib.loads(run.preset.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _finished_step(run: RunDir) -> int | None:
    """The step of the run's `run_finished`, unless a later attempt reopened it."""
    records, _ = read_events(run.events)
    for record in reversed(records):
        kind = record.get("type")
        if kind in ("run_started", "resumed"):
            return None
        if kind in TERMINAL_TYPES:
            return record.get("step") if kind == "run_finished" and isinstance(record.get("step"), int) else None
    return None


def check_resume(run: RunDir, preset) -> None:
    """Raise PresetError when `preset` cannot continue `run`; writes nothing."""
    original = _read_original(run)
    if original is not None:
        changes = incompatible_changes(original, preset.model_dump(mode="json", exclude_none=True))
        if changes:
            raise PresetError(
                f"Cannot resume run {run.name} with these changes: "
                + ", ".join(changes)
                + f". A resume keeps training the same adapter on the same data: {FROZEN_TEXT} cannot change",
                where=str(run.preset),
                hint=f"Resume without those --set keys (its preset.toml is unchanged), or start a new run with them: "
                f"`sftop run {run.preset} --set ...`",
            )
    done = _finished_step(run)
    max_steps = preset.train.max_steps
    if done is not None and (max_steps is None or max_steps <= done):
        raise PresetError(
            f"Run {run.name} already finished at step {done}; resuming it would train past its end",
            where=str(run.path),
            hint=f"Its adapter is in {run.adapter}. To train it further, resume with more steps: "
            f"`sftop resume {run.name} --set train.max_steps={done * 2}`",
        )


def predated_keys(run: RunDir) -> dict[str, str]:
    """The keys of RECORDED_BEFORE_KEY that the run's preset.toml predates, with what it trained with."""
    original = _read_original(run)
    if original is None:
        return {}
    recorded = _flatten(original)
    return {key: value for key, value in RECORDED_BEFORE_KEY.items() if key not in recorded}


def resume_preset_path(run: RunDir) -> Path:
    """Where a resume attempt writes its resolved preset: never over the run's original preset.toml."""
    if not run.preset.exists():
        return run.preset
    n = 1
    while (run.path / f"preset.resume-{n}.toml").exists():
        n += 1
    return run.path / f"preset.resume-{n}.toml"
