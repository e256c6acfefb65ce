"""Read the rows named by `data.source`: a local file, a folder, a hub id, or `builtin:NAME`.

Rows come back as plain dicts. JSON Lines files are parsed line by line so that one malformed line
becomes one reported bad row rather than a failed run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from sftop.engine.data.builtin import PREFIX as BUILTIN_PREFIX
from sftop.engine.data.builtin import load_builtin
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import DataSection

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SUPPORTED = "JSONL, JSON, CSV, TSV or Parquet file, a folder written by `datasets.save_to_disk`, a Hugging Face hub id, or builtin:NAME"


@dataclass
class RawRows:
    """The rows of one source. `rows[i]` is None where `errors[i]` says why the row is unreadable."""

    source: str  # as the user wrote it
    kind: str  # jsonl, json, csv, tsv, parquet, saved, hub, builtin
    rows: Sequence[Any]
    errors: dict[int, str] = field(default_factory=dict)
    total_rows: int | None = None  # rows in the source before data.max_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    @property
    def columns(self) -> list[str]:
        """Column names, from the first rows (JSON rows need not all share the same keys)."""
        features = getattr(self.rows, "column_names", None)
        if features is not None:
            return list(features)
        seen: dict[str, None] = {}
        for i, row in enumerate(self.rows):
            if i >= 200:
                break
            if isinstance(row, dict):
                seen.update(dict.fromkeys(row))
        return list(seen)


class _ArrowRows(Sequence):
    """A pyarrow table read as dict rows in batches, without converting it all at once."""

    def __init__(self, table):
        self.table = table
        self.column_names = list(table.column_names)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            return _ArrowRows(self.table.slice(start, max(0, stop - start)))
        return self.table.slice(index, 1).to_pylist()[0]

    def __iter__(self):
        for batch in self.table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()


def _missing(path: Path, source: str) -> DataError:
    return DataError(
        f"Dataset file {path} does not exist",
        where=f"data.source = {source!r}",
        hint=f"Check the path (relative paths are resolved from {Path.cwd()}), or use one of the built-in sets such as builtin:arithmetic",
    )


def _not_utf8(data: bytes, start: int, offset: int) -> str:
    """Why a line is not UTF-8, with the file offset of the first bad byte."""
    try:
        data.decode("utf-8")
        return "is not UTF-8"
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 (byte 0x{data[exc.start]:02x} at file offset {offset + exc.start - start})"


def _read_jsonl(path: Path) -> tuple[list, dict[int, str]]:
    rows: list = []
    errors: dict[int, str] = {}
    offset = 0
    # Bytes, decoded line by line: a bad byte costs its own row only, and its offset is the file's.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line_start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                line_start += 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors[len(rows)] = f"line {lineno} {_not_utf8(raw, 0, line_start)}"
                rows.append(None)
                continue
            if not line.strip():
                continue  # blank lines (often a trailing one) are not rows
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                errors[len(rows)] = f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})"
                rows.append(None)
    return rows, errors


def _read_json(path: Path, split: str) -> tuple[list, dict[int, str]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved under a .json name
            return _read_jsonl(path)
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            where=str(path),
            hint="Fix the file, or save it as JSON Lines (one object per line) so one bad row does not stop the run",
        ) from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split in lists:
            data = lists[split]
        elif len(lists) == 1:
            data = next(iter(lists.values()))
        else:
            raise DataError(
                f"{path} holds a JSON object, not a list of rows",
                where=str(path),
                hint=f"Store the rows as a top-level list, or under a key named after data.split ({split!r})",
            )
    if not isinstance(data, list):
        raise DataError(
            f"{path} holds a JSON {type(data).__name__}, not a list of rows",
            where=str(path),
            hint="Store the rows as a list of objects, or as JSON Lines",
        )
    return data, {}


def _read_csv(path: Path, delimiter: str) -> tuple[list, dict[int, str]]:
    """Rows of a CSV/TSV file. Undecodable bytes cost only the rows that hold them, and a quote that
    is never closed (it swallows every row after it into one field) is reported where it opened."""
    csv.field_size_limit(sys.maxsize)
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    text = data[bom:].decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return [], {}
    if any(_has_bad_bytes(h) for h in header):
        raise DataError(
            f"The header line of {path} is not UTF-8",
            where=f"{path}, line 1",
            hint="Save the file as UTF-8 (`iconv -t UTF-8` can convert it)",
        )
    rows: list = []
    errors: dict[int, str] = {}
    offsets: list[int] = []  # line offsets, computed at the first bad byte
    first_line = reader.line_num + 1
    for record in reader:
        last_line = reader.line_num
        lines = (first_line, last_line)
        first_line = last_line + 1
        if not record:
            continue  # a blank line
        index = len(rows)
        problem = _unclosed_quote(record, lines, len(header), delimiter)
        if problem is None and any(_has_bad_bytes(v) for v in record):
            where = next(i for i, v in enumerate(record) if _has_bad_bytes(v))
            offsets = offsets or _line_offsets(data)
            bad_at = _bad_byte_offset(data, offsets, *lines)
            problem = f"line {lines[0]} is not UTF-8 (column {header[where] if where < len(header) else where + 1}" + (
                f", byte 0x{data[bad_at]:02x} at file offset {bad_at})" if bad_at is not None else ")"
            )
        if problem is not None:
            errors[index] = problem
            rows.append(None)
            continue
        row: dict[str | None, str | list[str]] = dict(zip(header, record))
        if len(record) > len(header):
            row[None] = record[len(header) :]  # what csv.DictReader does with extra fields
        rows.append(row)
    return rows, errors


def _has_bad_bytes(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _line_offsets(data: bytes) -> list[int]:
    """File offset where each line starts (index 0 is line 1)."""
    starts, pos = [0], data.find(b"\n")
    while pos >= 0:
        starts.append(pos + 1)
        pos = data.find(b"\n", pos + 1)
    return starts


def _bad_byte_offset(data: bytes, line_offsets: list[int], first: int, last: int) -> int | None:
    """File offset of the first undecodable byte in lines `first`..`last` (1-based)."""
    start = line_offsets[first - 1]
    end = line_offsets[last] if last < len(line_offsets) else len(data)
    try:
        data[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        return start + exc.start
    return None


# A quoted field that holds this many line breaks, each followed by something shaped like a row,
# is an unclosed quote rather than a real multi-line value.
_SWALLOWED_ROWS = 2


def _unclosed_quote(record: list[str], lines: tuple[int, int], columns: int, delimiter: str) -> str | None:
    if lines[1] - lines[0] < _SWALLOWED_ROWS:
        return None
    for value in record:
        inner = value.split("\n")[1:]
        swallowed = sum(1 for part in inner if part.count(delimiter) >= max(1, columns - 1))
        if swallowed >= _SWALLOWED_ROWS or (len(record) != columns and swallowed):
            return (
                f"line {lines[0]} opens a quote that is not closed where the field ends: it runs to line "
                f"{lines[1]} and swallows {swallowed} row(s) after it; close the quote (a quote inside a "
                'field is written twice: "")'
            )
    return None


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return _ArrowRows(pq.read_table(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(
            f"Cannot read Parquet file {path}: {exc}",
            where=str(path),
            hint="Check that the file is a complete Parquet file",
        ) from None


def _read_file(path: Path, kind: str, split: str) -> tuple[Sequence, dict[int, str]]:
    try:
        return _read_file_as(path, kind, split)
    except UnicodeDecodeError as exc:
        # A whole-file format (JSON): the decoder saw the whole file, so exc.start is the file offset.
        data = path.read_bytes()
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at file offset {exc.start} (line {line}) "
            "cannot be decoded",
            where=f"{path}, line {line}",
            hint="Save the file as UTF-8 (most editors and `iconv -t UTF-8` can convert it), or as JSON Lines so "
            "that one bad row does not stop the run",
        ) from None
    except OSError as exc:
        raise DataError(
            f"Cannot read {path}: {exc.strerror or exc}", where=str(path), hint="Check the file's permissions"
        ) from None


def _read_file_as(path: Path, kind: str, split: str) -> tuple[Sequence, dict[int, str]]:
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path, split)
    if kind in ("csv", "tsv"):
        return _read_csv(path, "," if kind == "csv" else "\t")
    return _read_parquet(path), {}


def _read_saved(path: Path, split: str, source: str):
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
        raise DataError(
            f"Cannot read the saved dataset in {path}: {exc}",
            where=f"data.source = {source!r}",
            hint="Point data.source at the folder `save_to_disk` wrote",
        ) from None
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DataError(
                f"The saved dataset in {path} has no split {split!r}",
                where=f"data.split = {split!r}",
                hint="Its splits are " + ", ".join(loaded) + "; set data.split to one of them",
            )
        loaded = loaded[split]
    assert isinstance(loaded, Dataset)
    return _undecoded_media(loaded)


def _undecoded_media(dataset):
    """A dataset with Image features read as their stored `{"bytes", "path"}` dicts.

    `datasets` would decode every image while the rows are read, so one truncated file would stop
    the whole read; undecoded, each image is opened and checked on its own and a bad one costs
    only its row.
    """
    from datasets.features import Image

    def has_media(feature) -> bool:
        if isinstance(feature, Image):
            return True
        if isinstance(feature, dict):
            return any(has_media(f) for f in feature.values())
        inner = getattr(feature, "feature", None)
        return inner is not None and has_media(inner)

    if not has_media(dict(dataset.features)):
        return dataset
    return _ArrowRows(dataset.with_format("arrow")[:])


def _read_folder(path: Path, split: str, source: str) -> tuple[str, Sequence, dict[int, str]]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "saved", _read_saved(path, split, source), {}
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_KINDS)
    kinds = {FILE_KINDS[p.suffix.lower()] for p in files}
    if not files or len(kinds) > 1:
        found = "no data files" if not files else "files of several types (" + ", ".join(sorted(kinds)) + ")"
        raise DataError(
            f"The folder {path} holds {found}",
            where=f"data.source = {source!r}",
            hint=f"Point data.source at a {_SUPPORTED}; a folder may hold data files of one type, which are read in name order",
        )
    kind = kinds.pop()
    rows: list = []
    errors: dict[int, str] = {}
    for file in files:
        part, part_errors = _read_file(file, kind, split)
        errors.update({len(rows) + i: f"{file.name}: {reason}" for i, reason in part_errors.items()})
        rows.extend(part)
    return kind, rows, errors


def _offline() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _read_hub(source: str, section: DataSection):
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    offline = _offline()
    if not offline:
        from sftop.engine.hub_reach import unreachable_reason

        # Unreachable: offline mode from here on, so a cached copy loads at once and an uncached
        # one fails at once (below) instead of after datasets' retries.
        offline = unreachable_reason() is not None
    try:
        return _undecoded_media(load_dataset(source, split=section.split))
    except DatasetNotFoundError:
        if offline:
            raise _offline_error(source) from None
        raise DataError(
            f"No dataset named {source!r} on the Hugging Face hub, and no such local file or folder",
            where=f"data.source = {source!r}",
            hint="Check the spelling; for a gated or private dataset run `hf auth login` first",
        ) from None
    except (ConnectionError, OSError) as exc:
        text = str(exc).lower()
        if offline or any(word in text for word in ("offline", "connect", "reach", "resolve", "network")):
            raise _offline_error(source) from None
        raise DataError(
            f"Cannot load {source!r} from the hub: {exc}",
            where=f"data.source = {source!r}",
            hint="Check the dataset id and your network",
        ) from None
    except ValueError as exc:
        message = str(exc)
        if "split" in message.lower():
            raise DataError(
                f"The hub dataset {source!r} has no split {section.split!r}: {message}",
                where=f"data.split = {section.split!r}",
                hint="Set data.split to one of the dataset's splits",
            ) from None
        raise DataError(
            f"Cannot load {source!r} from the hub: {message}",
            where=f"data.source = {source!r}",
            hint="Check the dataset id, or download it and point data.source at the files",
        ) from None


def _offline_error(source: str) -> DataError:
    return DataError(
        f"{source!r} looks like a Hugging Face hub dataset, but the hub cannot be reached (offline or no network) and it is not in the local cache",
        where=f"data.source = {source!r}",
        hint=(
            "Download it on a machine with network access (`datasets.load_dataset(...).save_to_disk(DIR)` "
            "or the JSONL/Parquet files) and point data.source at that folder or file; if it is a local path, check the spelling"
        ),
    )


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or Path(source).suffix.lower() in FILE_KINDS
        or os.sep in source.strip("/").replace("/", "", 1)  # more than one level: owner/name/...
        or not _HUB_ID.match(source)
    )


def load_rows(section: DataSection) -> RawRows:
    """Read the rows `data.source` names, at most `data.max_rows` of them."""
    source = section.source.strip()
    if not source:
        raise DataError("data.source is empty", where="data.source", hint=f"Set it to a {_SUPPORTED}")
    errors: dict[int, str] = {}
    kind: str
    rows: Sequence[Any]
    if source.startswith(BUILTIN_PREFIX):
        kind, rows = "builtin", load_builtin(source)
    else:
        path = Path(source).expanduser()
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise DataError(
                f"{path} holds no rows: it is a device or a pipe, not a data file",
                where=f"data.source = {source!r}",
                hint=f"Point data.source at a {_SUPPORTED}",
            )
        if path.is_file():
            file_kind = FILE_KINDS.get(path.suffix.lower())
            if file_kind is None:
                raise DataError(
                    f"sftop cannot read {path.suffix or 'extension-less'} files ({path})",
                    where=f"data.source = {source!r}",
                    hint=f"Use a {_SUPPORTED}",
                )
            if path.stat().st_size == 0:
                raise DataError(
                    f"{path} holds no rows (the file is empty)",
                    where=f"data.source = {source!r}",
                    hint="Point data.source at a file with data in it",
                )
            kind = file_kind
            rows, errors = _read_file(path, kind, section.split)
        elif path.is_dir():
            kind, rows, errors = _read_folder(path, section.split, source)
        elif _looks_like_path(source):
            raise _missing(path, source)
        else:
            kind, rows = "hub", _read_hub(source, section)
    total = len(rows)
    if total == 0 and kind not in ("hub", "builtin"):
        raise DataError(
            f"{source} holds no rows"
            + (" (the file is empty)" if kind != "saved" and path.is_file() and path.stat().st_size == 0 else ""),
            where=f"data.source = {source!r}",
            hint="Point data.source at a file with data in it",
        )
    if section.max_rows is not None and total > section.max_rows:
        rows = rows.select(range(section.max_rows)) if hasattr(rows, "select") else rows[: section.max_rows]
        errors = {i: r for i, r in errors.items() if i < section.max_rows}
    return RawRows(source=source, kind=kind, rows=rows, errors=errors, total_rows=total)
