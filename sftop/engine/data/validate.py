"""Check rows before any model is loaded, and decide whether a run may go on.

Two passes: a structural one (`validate_rows`, no tokenizer: fields, types, roles, an assistant
turn) and a length one done while tokenising (rows over `data.max_length`). Bad rows are skipped
and counted; `ValidationReport.raise_if_too_many` stops the run when more than
`data.max_bad_fraction` of them are bad, listing the first few so they can be fixed.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field

from sftop.engine.data.conversation import ROLES, Conversation, RowProblem
from sftop.engine.data.formats import RowError, check_forced_format, detect_format, normalise_row
from sftop.engine.data.sources import RawRows
from sftop.engine.data.vision_rows import find_image_column, normalise_image_row
from sftop.engine.errors import DataError

SHOWN_PROBLEMS = 5


@dataclass
class ValidationReport:
    source: str
    format: str
    total_rows: int  # rows read (after data.max_rows)
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return len({p.index for p in self.problems})

    @property
    def good_rows(self) -> int:
        return self.total_rows - self.bad_rows

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.total_rows if self.total_rows else 0.0

    def add(self, index: int, reason: str) -> None:
        bisect.insort(self.problems, RowProblem(index, reason), key=lambda p: p.index)

    def reason_counts(self) -> dict[str, int]:
        """How many rows fail for each kind of reason (the reason text up to its first detail)."""
        return dict(Counter(_reason_kind(p.reason) for p in self.problems).most_common())

    def too_many(self, max_bad_fraction: float) -> bool:
        return self.good_rows == 0 or self.bad_fraction > max_bad_fraction

    def raise_if_too_many(self, max_bad_fraction: float) -> None:
        if not self.too_many(max_bad_fraction):
            return
        shown = "; ".join(f"row {p.index}: {p.reason}" for p in self.problems[:SHOWN_PROBLEMS])
        more = self.bad_rows - len({p.index for p in self.problems[:SHOWN_PROBLEMS]})
        if more > 0:
            shown += f"; and {more} more row(s)"
        if self.total_rows == 0:
            raise DataError(
                f"{self.source} holds no rows",
                where=f"data.source = {self.source!r}",
                hint="Point data.source at a file with data in it",
            )
        if self.good_rows == 0:
            what = f"None of the {self.total_rows} rows of {self.source} can be used ({shown})"
            hint = "Fix the rows, or check that data.format matches the file (run `sftop data check PRESET` to see every problem)"
        else:
            what = (
                f"{self.bad_rows} of {self.total_rows} rows of {self.source} ({self.bad_fraction:.1%}) cannot be used, "
                f"more than data.max_bad_fraction = {max_bad_fraction:g} allows ({shown})"
            )
            hint = (
                "Fix those rows (`sftop data check PRESET` lists them all), or raise data.max_bad_fraction "
                f"(e.g. --set data.max_bad_fraction={min(1.0, round(self.bad_fraction + 0.01, 2)):g}) to skip them"
            )
        too_long = [p for p in self.problems if "longer than data.max_length" in p.reason]
        if too_long:
            longest = max(int(p.reason.split(" ", 1)[0]) for p in too_long)
            hint += f"; {len(too_long)} row(s) are too long: raise data.max_length (the longest has {longest} tokens) to keep them"
        raise DataError(what, where=f"data.source = {self.source!r}", hint=hint)

    def to_dict(self, limit: int = SHOWN_PROBLEMS) -> dict:
        return {
            "total_rows": self.total_rows,
            "bad_rows": self.bad_rows,
            "bad_fraction": round(self.bad_fraction, 4),
            "problems": [p.to_dict() for p in self.problems[:limit]],
        }


_IMAGE_SUBJECT = re.compile(
    r"^(image N: )(file|embedded image|inline image|URL|image)\b.*"
    r" (is |does not exist|cannot be read|has no pixels|holds neither)"
)


def _reason_kind(reason: str) -> str:
    """Group reasons that differ only in numbers and trailing detail ("row 3 ..." vs "row 9 ..."),
    and image reasons that differ only in which file ("image 1: file a.jpg is truncated")."""
    kind = re.sub(r"\s*\([^()]*\)$", "", re.sub(r"\d+", "N", reason))
    return _IMAGE_SUBJECT.sub(r"\1\2 … \3", kind)


def check_structure(conv: Conversation, loss_on: str, *, allow_images: bool = False) -> None:
    """Raise `RowError` if the conversation cannot be trained on as it is."""
    if conv.document is not None:
        if not conv.document.strip():
            raise RowError("`text` is empty")
        return
    msgs = conv.messages
    if not msgs:
        raise RowError("has no messages")
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise RowError(f"message {i} has unknown role {m.role!r} (expected system, user or assistant)")
        if m.has_image and not allow_images:
            raise RowError(f"message {i} holds an image, and this model reads text only")
        if not m.text_content.strip() and not m.has_image:
            raise RowError(f"message {i} ({m.role}) has empty content")
    start = 1 if msgs[0].role == "system" else 0
    for i in range(start, len(msgs)):
        m = msgs[i]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m.role != expected:
            after = f"after {msgs[i - 1].role}" if i > 0 else "first"
            raise RowError(
                f"bad role order: message {i} is {m.role} {after} (after an optional system message, "
                "turns must alternate user, assistant, user, ...)"
            )
    if loss_on == "assistant" and not any(m.role == "assistant" for m in msgs):
        raise RowError("no assistant message to train on")


def resolve_format(raw: RawRows, forced: str) -> str:
    source = f"{raw.source}"
    if forced == "auto":
        return detect_format(raw.columns, source=source)
    check_forced_format(forced, raw.columns, source=source)
    return forced


def validate_rows(
    raw: RawRows, fmt: str, loss_on: str, *, allow_images: bool = False
) -> tuple[list[Conversation], ValidationReport]:
    """Structural pass: normalise every row, keep the good ones, report the rest by index."""
    report = ValidationReport(source=raw.source, format=fmt, total_rows=len(raw))
    good: list[Conversation] = []
    image_column = find_image_column(raw.columns)
    for index, row in enumerate(raw):
        if index in raw.errors:
            report.add(index, raw.errors[index])
            continue
        try:
            conv = (
                normalise_image_row(row, fmt, index, image_column)
                if isinstance(row, dict)
                else normalise_row(row, fmt, index)
            )
            check_structure(conv, loss_on, allow_images=allow_images)
        except RowError as exc:
            report.add(index, str(exc))
            continue
        good.append(conv)
    return good, report
