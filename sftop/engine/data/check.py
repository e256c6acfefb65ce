"""`sftop data check PRESET`: what a run would train on, before paying for a GPU.

`check_data` runs the same pipeline as a run (never stopping at `data.max_bad_fraction`, so every
problem can be listed) and returns a `DataCheckResult`; `render_check` turns it into text for the
terminal. The TUI reads the dataclass directly: `sample_spans` is the sample as (text, trained)
runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from sftop.engine.data import check_images
from sftop.engine.data.conversation import RowProblem
from sftop.engine.data.prepare import DataStats, encode_structured, split_eval, validate_structure
from sftop.engine.data.tokenize import trained_spans
from sftop.engine.presets.schema import Preset

if TYPE_CHECKING:
    from sftop.engine.data.preferences_check import PreferenceCheckResult

PROBLEMS_KEPT = 50
PROBLEMS_SHOWN = 10

_DIM, _BOLD, _RED, _GREEN, _YELLOW, _RESET = "\x1b[2m", "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m"
TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


class RowVerdict:
    """Whether a checked dataset would stop a run: shared by the SFT and preference checks."""

    rows_read: int
    bad_rows: int
    max_bad_fraction: float

    @property
    def usable_rows(self) -> int:
        return self.rows_read - self.bad_rows

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.rows_read if self.rows_read else 0.0

    @property
    def would_stop(self) -> bool:
        """A run with this preset would stop with a DataError before training."""
        return self.usable_rows == 0 or self.bad_fraction > self.max_bad_fraction


@dataclass
class DataCheckResult(RowVerdict):
    source: str
    source_kind: str
    format: str
    format_forced: bool
    tokenizer: str
    loss_on: str
    max_length: int
    max_bad_fraction: float
    eval_rows: int  # rows a run would hold out for evaluation (data.eval_fraction)
    rows_in_source: int  # before data.max_rows
    rows_read: int
    bad_rows: int
    stats: DataStats
    problems: list[RowProblem] = field(default_factory=list)  # first PROBLEMS_KEPT, by row index
    problem_kinds: dict[str, int] = field(default_factory=dict)  # reason kind -> rows
    sample_index: int | None = None  # source row shown
    sample_spans: list[tuple[str, bool]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    quick: bool = False  # only the first rows were checked (check_data's max_rows), not data.max_rows
    # Image datasets (None / empty otherwise); see check_images.py
    image_stats: Any = None  # ImageStats
    image_rules_source: str = ""
    image_tokens_counted: bool = False
    sample_images: list = field(default_factory=list)  # the sample's PIL images at their final size
    sample_image_sizes: list = field(default_factory=list)  # [((w, h) before, (w, h) after), ...]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "source_kind": self.source_kind,
            "format": self.format,
            "tokenizer": self.tokenizer,
            "rows_in_source": self.rows_in_source,
            "rows_read": self.rows_read,
            "bad_rows": self.bad_rows,
            "eval_rows": self.eval_rows,
            "would_stop": self.would_stop,
            "stats": self.stats.to_dict(),
            "problems": [p.to_dict() for p in self.problems],
            "sample_index": self.sample_index,
            "sample_spans": [[t, trained] for t, trained in self.sample_spans],
            "warnings": list(self.warnings),
            "quick": self.quick,
            "images": self.image_stats.to_dict() if self.image_stats is not None else None,
            "sample_images": [{"before": list(o), "after": list(f)} for o, f in self.sample_image_sizes],
        }


def check_data(
    preset: Preset,
    tokenizer=None,
    *,
    max_rows: int | None = None,
    allow_images: bool = True,
    image_rules: Any = None,
    image_tokens: Callable[[int, int], int] | None = None,
) -> "DataCheckResult | PreferenceCheckResult":
    """Run the data pipeline of `preset` and summarise it. Loads the model's tokenizer if not given.

    `max_rows` checks only the first rows (a quick look at a big dataset); a run reads them all.
    Rows with images: `image_rules` (a vision family's `ImageRules`; generic ones when None) decide
    the checks and the pixel budget; `image_tokens(width, height)` (the family's exact count) lets
    the check count image tokens and drop rows too long with them. `allow_images=False` (a text
    model) makes rows holding images bad rows, as a run would.
    """
    if preset.train.task == "dpo":
        from sftop.engine.data.preferences_check import check_preferences

        return check_preferences(preset, tokenizer, max_rows=max_rows)
    section = preset.data
    quick = max_rows is not None and (section.max_rows is None or max_rows < section.max_rows)
    if quick:
        section = section.model_copy(update={"max_rows": max_rows})
    structured = validate_structure(section, strict=False, allow_images=allow_images)
    images = None
    if allow_images and check_images.has_images(structured):
        images = check_images.check_images(structured, section, image_rules)
    tokenizer_name = preset.model.name
    if tokenizer is None:
        from sftop.engine.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(preset.model)
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    encoding = encode_structured(structured, section, tokenizer)
    encoded, report = encoding.encoded, encoding.report
    sample = encoded[0] if encoded else None
    stats = DataStats.from_encoded(encoded)
    extra: dict[str, Any] = {}
    shown = None
    if images is not None:
        encoded, per_row = check_images.drop_over_length(encoded, images, image_tokens, section.max_length, report)
        stats = check_images.stats_with_images(encoded, per_row)
        shown = check_images.image_sample(structured, encoded, images, tokenizer, section)
        extra = {
            "image_stats": check_images.image_stats(encoded, images, image_tokens),
            "image_rules_source": images.rules_source,
            "image_tokens_counted": image_tokens is not None,
        }
        sample = encoded[0] if encoded else None
        if shown is not None:
            extra.update(sample_images=shown.images, sample_image_sizes=shown.sizes)
    return DataCheckResult(
        source=structured.raw.source,
        source_kind=structured.raw.kind,
        format=structured.format,
        format_forced=section.format != "auto",
        tokenizer=tokenizer_name,
        loss_on=section.loss_on,
        max_length=section.max_length,
        max_bad_fraction=section.max_bad_fraction,
        eval_rows=len(split_eval(len(encoded), section.eval_fraction, preset.train.seed)),
        rows_in_source=structured.raw.total_rows if structured.raw.total_rows is not None else report.total_rows,
        rows_read=report.total_rows,
        bad_rows=report.bad_rows,
        stats=stats,
        problems=report.problems[:PROBLEMS_KEPT],
        problem_kinds=report.reason_counts(),
        sample_index=shown.index if shown is not None else (sample.source_index if sample else None),
        sample_spans=(
            shown.spans
            if shown is not None
            else trained_spans(tokenizer, sample.input_ids, sample.labels)
            if sample
            else []
        ),
        warnings=encoding.warnings,
        quick=quick and structured.raw.total_rows is not None and structured.raw.total_rows > report.total_rows,
        **extra,
    )


_KIND_NAMES = {
    "builtin": "built-in set",
    "saved": "saved dataset",
    "hub": "hub dataset",
    "jsonl": "JSON Lines file",
    "json": "JSON file",
    "csv": "CSV file",
    "tsv": "TSV file",
    "parquet": "Parquet file",
}


def render_check(result: "DataCheckResult | PreferenceCheckResult", color: bool = False) -> str:
    def style(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    if not isinstance(result, DataCheckResult):  # preference pairs (train.task = "dpo")
        from sftop.engine.data.preferences_check import render_preference_check

        return render_preference_check(result, color)
    s = result.stats
    kind = _KIND_NAMES.get(result.source_kind, result.source_kind)
    fmt = f"{result.format} format" + (" (forced by data.format)" if result.format_forced else " (detected)")
    lines = [style(f"Data check: {result.source}", _BOLD), f"  {kind}, {fmt}, tokenizer of {result.tokenizer}"]
    limited = ""
    if result.rows_in_source > result.rows_read:
        why = "a quick check" if result.quick else "data.max_rows"
        limited = f" (first {result.rows_read:,} of {result.rows_in_source:,}: {why})"
    lines.append(
        f"  rows      {result.rows_read:,} read{limited}, {result.usable_rows:,} usable, {result.bad_rows:,} skipped"
    )
    lines.append(
        f"  tokens    p50 {s.length_p50:,} · p90 {s.length_p90:,} · p99 {s.length_p99:,} · max {s.length_max:,}"
        f"  (data.max_length {result.max_length:,})"
    )
    on = "assistant turns" if result.loss_on == "assistant" else "every token"
    lines.append(f"  trained   {s.trained_share:.1%} of {s.tokens:,} tokens ({s.trained_tokens:,}; loss on {on})")
    if result.eval_rows:
        lines.append(f"  eval      {result.eval_rows:,} rows held out (data.eval_fraction)")
    if result.image_stats is not None:
        lines += check_images.render_image_lines(
            result.image_stats, result.image_rules_source, result.image_tokens_counted
        )

    if result.problems:
        lines.append(style(f"Problems ({result.bad_rows:,} row(s) skipped):", _BOLD))
        if result.bad_rows > PROBLEMS_SHOWN:
            for kind_text, count in result.problem_kinds.items():
                lines.append(f"  {count:>6,} × {kind_text}")
        for p in result.problems[:PROBLEMS_SHOWN]:
            lines.append(f"  row {p.index}: {p.reason}")
        if result.bad_rows > PROBLEMS_SHOWN:
            lines.append(f"  … and {result.bad_rows - PROBLEMS_SHOWN:,} more row(s)")
    else:
        lines.append("Problems: none")

    for warning in result.warnings:
        lines.append(style(f"Warning: {warning}.", _YELLOW))
    if result.would_stop:
        if result.usable_rows == 0:
            verdict = "STOP: no row can be used; a run would stop before training."
        else:
            verdict = (
                f"STOP: {result.bad_fraction:.1%} of rows are unusable, more than data.max_bad_fraction = "
                f"{result.max_bad_fraction:g}; a run would stop before training. Fix the rows listed, "
                "or raise data.max_bad_fraction to skip them."
            )
        lines.append(style(verdict, _RED))
    else:
        skipped = f" ({result.bad_rows:,} skipped)" if result.bad_rows else ""
        lines.append(style(f"OK: a run would train on {result.usable_rows:,} rows{skipped}.", _GREEN))

    if result.sample_spans:
        legend = (
            "dim = context, not trained"
            if color
            else f"trained tokens {TRAINED_OPEN}marked{TRAINED_CLOSE}, the rest is context"
        )
        lines.append(style(f"Sample (row {result.sample_index}; {legend}):", _BOLD))
        if result.sample_image_sizes:
            lines.append(
                "  "
                + ", ".join(
                    check_images.image_label(k, o, f) for k, (o, f) in enumerate(result.sample_image_sizes, start=1)
                )
            )
        parts = []
        spans = list(result.sample_spans)
        while spans and not spans[-1][0].strip("\n"):
            spans.pop()  # trailing template newline: an empty last line says nothing
        for text, trained in spans:
            if color:
                # Dim each line on its own so the indentation added below stays outside the codes.
                parts.append(
                    text if trained else "\n".join(style(seg, _DIM) if seg else seg for seg in text.split("\n"))
                )
            else:
                parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
        body = "".join(parts)
        lines.extend("  " + line for line in body.split("\n"))
    return "\n".join(lines)
