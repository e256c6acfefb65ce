"""`sftop data check` for preference data (`train.task = "dpo"`).

Runs the same pipeline as a DPO run and reports: the detected layout, rows skipped by index and
why (chosen equal to rejected, an empty side, a missing prompt, chosen and rejected answering
different prompts, pairs over `data.max_length`, which are dropped and never truncated), and the
token length distribution of the prompt and of each answer.  The result carries the attributes the
TUI's dataset step reads from a `DataCheckResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftop.engine.data.check import RowVerdict
from sftop.engine.data.conversation import RowProblem
from sftop.engine.data.preference_prepare import PreferenceStats, read_preferences
from sftop.engine.data.prepare import split_eval
from sftop.engine.presets.schema import Preset

PROBLEMS_KEPT = 50
PROBLEMS_SHOWN = 10
_BOLD, _RED, _GREEN, _YELLOW, _RESET = "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[0m"


@dataclass
class PreferenceCheckResult(RowVerdict):
    source: str
    source_kind: str
    format: str
    format_forced: bool
    tokenizer: str
    max_length: int
    max_bad_fraction: float
    eval_rows: int
    rows_in_source: int
    rows_read: int
    bad_rows: int
    stats: PreferenceStats
    problems: list[RowProblem] = field(default_factory=list)
    problem_kinds: dict[str, int] = field(default_factory=dict)
    sample_index: int | None = None
    sample_spans: list[tuple[str, bool]] = field(default_factory=list)  # prompt (context) + chosen (trained)
    sample_rejected: str = ""
    quick: bool = False
    loss_on: str = "answers"  # the chosen and rejected answers are scored; the prompt is context
    warnings: list[str] = field(default_factory=list)
    images: dict | None = None  # a vision-language model's pairs: their images (see `_image_summary`)

    def to_dict(self) -> dict:
        return {
            "task": "dpo",
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
            "quick": self.quick,
            "images": self.images,
        }


def check_preferences(preset: Preset, tokenizer=None, *, max_rows: int | None = None) -> PreferenceCheckResult:
    section = preset.data
    quick = max_rows is not None and (section.max_rows is None or max_rows < section.max_rows)
    if quick:
        section = section.model_copy(update={"max_rows": max_rows})
    tokenizer_name = preset.model.name
    if tokenizer is None:
        from sftop.engine.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(preset.model)
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    from sftop.engine.models.vision.detect import family_on_disk

    family = family_on_disk(preset.model.name)
    images = None
    prefs: Any
    if family is not None:  # a vision-language model: images decoded and checked, sides measured with them
        from sftop.engine.models.vision.loading import load_processor
        from sftop.engine.train.vision_dpo_data import read_vision_preferences

        processor = load_processor(preset.model, family)
        tokenizer, tokenizer_name = processor.tokenizer, preset.model.name
        prefs, _ = read_vision_preferences(section, processor, family)
        images = _image_summary(prefs)
    else:
        prefs = read_preferences(section, tokenizer)
    report = prefs.report
    sample = prefs.encoded[0] if prefs.encoded else None
    spans, rejected = [], ""
    if sample is not None:
        spans = [
            (_collapse_runs(tokenizer.decode(sample.prompt_ids)), False),
            (tokenizer.decode(sample.chosen_ids), True),
        ]
        rejected = tokenizer.decode(sample.rejected_ids)
    total = prefs.raw.total_rows if prefs.raw.total_rows is not None else report.total_rows
    return PreferenceCheckResult(
        source=prefs.raw.source,
        source_kind=prefs.raw.kind,
        format=prefs.format,
        format_forced=section.format != "auto",
        tokenizer=tokenizer_name,
        max_length=section.max_length,
        max_bad_fraction=section.max_bad_fraction,
        eval_rows=len(split_eval(len(prefs.encoded), section.eval_fraction, preset.train.seed)),
        rows_in_source=total,
        rows_read=report.total_rows,
        bad_rows=report.bad_rows,
        stats=PreferenceStats.from_encoded(prefs.encoded, too_long=prefs.too_long),
        problems=report.problems[:PROBLEMS_KEPT],
        problem_kinds=report.reason_counts(),
        sample_index=sample.source_index if sample else None,
        sample_spans=spans,
        sample_rejected=rejected,
        quick=quick and total > report.total_rows,
        images=images,
    )


def _image_summary(prefs) -> dict:
    """Images of the usable pairs: how many, their final sizes, and the image tokens of one side."""
    from sftop.engine.data.image_check import SizeSummary
    from sftop.engine.data.prepare import _percentile

    tokens = sorted(prefs.image_tokens)
    return {
        "pairs_with_images": sum(1 for sizes in prefs.image_sizes if sizes),
        "images": sum(len(sizes) for sizes in prefs.image_sizes),
        "sizes": SizeSummary.of([final for sizes in prefs.image_sizes for _original, final in sizes]).to_dict(),
        "image_tokens_p50": _percentile(tokens, 50),
        "image_tokens_max": tokens[-1] if tokens else 0,
    }


def _collapse_runs(text: str) -> str:
    """A repeated special token (an image's hundreds of placeholders) shown once with its count."""
    import re

    return re.sub(r"(<[^<>\s]+>)\1+", lambda m: f"{m.group(1)}×{len(m.group(0)) // len(m.group(1))}", text)


def render_preference_check(result: PreferenceCheckResult, color: bool = False) -> str:
    def style(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    s = result.stats
    how = "forced by data.format" if result.format_forced else "detected"
    lines = [
        style(f"Data check (preference pairs, train.task = dpo): {result.source}", _BOLD),
        f"  {result.format} format ({how}), tokenizer of {result.tokenizer}",
    ]
    limited = (
        f" (first {result.rows_read:,} of {result.rows_in_source:,})"
        if result.rows_in_source > result.rows_read
        else ""
    )
    lines.append(
        f"  pairs     {result.rows_read:,} read{limited}, {result.usable_rows:,} usable, {result.bad_rows:,} skipped"
    )
    for name, summary in (("prompt", s.prompt), ("chosen", s.chosen), ("rejected", s.rejected)):
        lines.append(f"  {name:<9} tokens p50 {summary.p50:,} · p90 {summary.p90:,} · max {summary.max:,}")
    if result.images is not None:
        im, px = result.images, result.images["sizes"]["pixels"]
        lines.append(
            f"  images    {im['images']:,} in {im['pairs_with_images']:,} pairs, checked and resized to "
            f"{px[0]:,}-{px[2]:,} pixels; {im['image_tokens_p50']:,} image tokens per side "
            f"(max {im['image_tokens_max']:,}), shown to the model once per side"
        )
    lines.append(
        f"  longest   prompt + answer {s.pair_max:,} tokens (data.max_length {result.max_length:,}; "
        "longer pairs are dropped, never truncated)"
    )
    if s.too_long:
        lines.append(style(f"  {s.too_long:,} pair(s) over data.max_length dropped", _YELLOW))
    if result.eval_rows:
        lines.append(f"  eval      {result.eval_rows:,} pairs held out (data.eval_fraction)")
    if result.problems:
        lines.append(style(f"Problems ({result.bad_rows:,} pair(s) skipped):", _BOLD))
        if result.bad_rows > PROBLEMS_SHOWN:
            for kind_text, count in result.problem_kinds.items():
                lines.append(f"  {count:>6,} × {kind_text}")
        for p in result.problems[:PROBLEMS_SHOWN]:
            lines.append(f"  row {p.index}: {p.reason}")
        if result.bad_rows > PROBLEMS_SHOWN:
            lines.append(f"  … and {result.bad_rows - PROBLEMS_SHOWN:,} more row(s)")
    else:
        lines.append("Problems: none")
    if result.would_stop:
        if result.usable_rows == 0:
            verdict = "STOP: no pair can be used; a run would stop before training."
        else:
            verdict = (
                f"STOP: {result.bad_fraction:.1%} of pairs are unusable, more than data.max_bad_fraction = "
                f"{result.max_bad_fraction:g}; a run would stop before training. Fix the rows listed, "
                "or raise data.max_bad_fraction to skip them."
            )
        lines.append(style(verdict, _RED))
    else:
        skipped = f" ({result.bad_rows:,} skipped)" if result.bad_rows else ""
        lines.append(style(f"OK: a run would train on {result.usable_rows:,} pairs{skipped}.", _GREEN))
    if result.sample_spans:
        prompt, chosen = result.sample_spans[0][0], result.sample_spans[1][0]
        lines.append(style(f"Sample (row {result.sample_index}):", _BOLD))
        lines.extend("  " + line for line in prompt.rstrip("\n").split("\n"))
        lines.append("  chosen:   " + chosen.strip().replace("\n", "\n            "))
        lines.append("  rejected: " + result.sample_rejected.strip().replace("\n", "\n            "))
    return "\n".join(lines)
