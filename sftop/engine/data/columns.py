"""`data.columns`: read a dataset whose columns have other names (`question`/`answer`,
`input`/`target`, ...) by mapping sftop's column names to the file's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sftop.engine.errors import DataError

# The column names the formats read (sftop/engine/data/formats.py).
KNOWN = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "system", "text")

EXAMPLE = '[data.columns] prompt = "question", completion = "answer" (or --set data.columns.prompt=question)'


class _Renamed(Sequence):
    def __init__(self, rows: Sequence[Any], renames: dict[str, str]):
        self._rows = rows
        self._renames = renames  # the file's name -> sftop's name

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._rows[index]
        if not isinstance(row, dict):
            return row
        targets = set(self._renames.values())
        out = {k: v for k, v in row.items() if k not in self._renames and k not in targets}
        for theirs, ours in self._renames.items():
            if theirs in row:
                out[ours] = row[theirs]
        return out


def map_columns(raw, mapping: dict[str, str]):
    """`raw` with its columns renamed by `mapping` (sftop's name -> the file's name)."""
    if not mapping:
        return raw
    columns = raw.columns
    missing = {ours: theirs for ours, theirs in mapping.items() if theirs not in columns}
    if missing:
        ours, theirs = next(iter(missing.items()))
        raise DataError(
            f"data.columns.{ours} names the column `{theirs}`, which {raw.source} does not have "
            f"(its columns are {', '.join(sorted(columns)) or 'none'})",
            where=f"data.columns.{ours}",
            hint="Use one of the listed column names",
        )
    renamed = _Renamed(raw.rows, {theirs: ours for ours, theirs in mapping.items()})
    return replace(raw, rows=renamed)
