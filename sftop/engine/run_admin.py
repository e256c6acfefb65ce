"""Naming, listing and removing runs: what `sftop runs` and `sftop runs rm` show and do.

A run is named after its preset and its data (`20261206-101500-demo-arithmetic`), so a list of
runs of one preset on several datasets, or several presets on one dataset, reads at a glance.
"""

from __future__ import annotations

import re
import shutil
import time
import tomllib
from pathlib import PurePath

from sftop.engine.errors import SftopError
from sftop.engine.rundir import RunDir
from sftop.engine.runs import RunSummary, effective_status
from sftop.engine.supervisor import ACTIVE_STATUSES

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def data_label(source: str) -> str:
    """A short name for a data source: the built-in's name, the file's stem, the hub repo's name."""
    source = source.strip().rstrip("/")
    if source.startswith("builtin:"):
        return source.split(":", 1)[1]
    if _HUB_ID.match(source) and not source.startswith((".", "~")):
        return source.split("/", 1)[1]
    path = PurePath(source)
    return path.stem if path.suffix else path.name


def run_label(preset) -> str:
    """`PRESET-DATA`, or just the preset's name when it already names the data."""
    name, data = preset.name, data_label(preset.data.source)
    if not data or data.lower() in name.lower():
        return name
    return f"{name}-{data}"


def _data_from_preset(run: RunDir) -> str | None:
    try:
        data = tomllib.loads(run.preset.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    section = data.get("data")
    source = section.get("source") if isinstance(section, dict) else None
    return data_label(source) if isinstance(source, str) else None


_COLUMNS = ("RUN", "STATUS", "STEP", "LOSS", "STARTED", "MODEL", "DATA")


def render_runs(runs: list[RunSummary]) -> list[str]:
    """A header and one line per run, columns sized to their contents."""
    rows = []
    for r in runs:
        loss = r.final_loss if r.final_loss is not None else r.loss
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)) if r.started else "-"
        rows.append(
            (
                r.name,
                r.status,
                r.progress,
                f"{loss:.4f}" if loss is not None else "-",
                started,
                r.model or "?",
                _data_from_preset(r.run) or "?",
            )
        )
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [_COLUMNS, *rows]]


def remove_run(run: RunDir) -> str:
    """Delete a run directory; a run that is still going is refused (stop it first)."""
    status = effective_status(run)
    if status in ACTIVE_STATUSES:
        raise SftopError(
            f"Run {run.name} is {status}: removing it would pull the files from under the trainer",
            where=str(run.path),
            hint=f"Stop it first with `sftop stop {run.name} --wait`, then remove it",
        )
    shutil.rmtree(run.path)
    return f"sftop: removed {run.path}"
