"""Preference pairs for the DPO trainer: read, check, tokenise with the length policy, split.

source -> rows -> preference format -> `PreferencePair`s -> token ids per side -> length policy ->
train/eval split -> `datasets.Dataset` with `prompt_ids`, `chosen_ids` and `rejected_ids`, the
columns TRL's `DPOTrainer` collates (it skips its own tokenisation for such a dataset, see
`sftop.engine.train.dpo`).

Tokenisation follows TRL's: the prompt is rendered with the chat template ending in the generation
prompt, each side as prompt + answer; the answer's tokens start where the two token sequences part.
Raw-text pairs are tokenised as they are, with the end-of-sequence token added to each answer.

Length policy: a pair is trained only whole.  When prompt + the longer answer exceeds
`data.max_length`, the pair is dropped and counted ("too long"), never truncated: a cut answer
teaches the model to prefer half a sentence, and a cut prompt asks a different question.  Raise
`data.max_length` to keep such pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sftop.engine.data.formats import RowError
from sftop.engine.data.prepare import _percentile, split_rows
from sftop.engine.data.preferences import PreferencePair, resolve_preference_format, validate_pairs
from sftop.engine.data.sources import RawRows, load_rows
from sftop.engine.data.tokenize import Encoder
from sftop.engine.data.validate import ValidationReport
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import DataSection, Preset

TOO_LONG = "pair is too long"


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source_index: int

    @property
    def length(self) -> int:
        """Tokens of the longer side (prompt + answer): what must fit in data.max_length."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class LengthSummary:
    p50: int
    p90: int
    max: int

    @classmethod
    def of(cls, lengths: list[int]) -> "LengthSummary":
        values = sorted(lengths)
        return cls(_percentile(values, 50), _percentile(values, 90), values[-1] if values else 0)


@dataclass
class PreferenceStats:
    pairs: int  # usable pairs (train + eval)
    train_pairs: int
    eval_pairs: int
    too_long: int  # pairs dropped by the length policy
    tokens: int  # prompt + chosen + prompt + rejected over usable pairs: what the forwards see
    prompt: LengthSummary
    chosen: LengthSummary  # answer tokens only
    rejected: LengthSummary
    pair_max: int  # longest prompt + answer kept

    answer_tokens: int = 0  # chosen + rejected answer tokens: the ones scored

    @property
    def trained_share(self) -> float:
        """Share of the forwards' tokens that are scored (the answers), as SFT's trained share."""
        return self.answer_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_encoded(cls, encoded: list[EncodedPair], *, eval_pairs: int = 0, too_long: int = 0) -> "PreferenceStats":
        return cls(
            pairs=len(encoded),
            train_pairs=len(encoded) - eval_pairs,
            eval_pairs=eval_pairs,
            too_long=too_long,
            tokens=sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in encoded),
            prompt=LengthSummary.of([len(e.prompt_ids) for e in encoded]),
            chosen=LengthSummary.of([len(e.chosen_ids) for e in encoded]),
            rejected=LengthSummary.of([len(e.rejected_ids) for e in encoded]),
            pair_max=max((e.length for e in encoded), default=0),
            answer_tokens=sum(len(e.chosen_ids) + len(e.rejected_ids) for e in encoded),
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PairEncoder:
    """Token ids of preference pairs for one tokenizer, with the length policy of one `data` section."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._chat = Encoder(tokenizer)

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, pair: PreferencePair) -> EncodedPair:
        if pair.has_images:
            raise RowError("the pair holds images, and this model reads text only")
        if pair.text is not None:
            prompt, chosen, rejected = pair.text
            eos = self.tokenizer.eos_token or ""
            p = self._ids(prompt, special=True)
            c = self._ids(prompt + chosen + (eos if not chosen.endswith(eos) else ""), special=True)
            r = self._ids(prompt + rejected + (eos if not rejected.endswith(eos) else ""), special=True)
        else:
            try:
                p = self._ids(
                    self._chat.render(pair.template_messages("prompt"), add_generation_prompt=True), special=False
                )
                c = self._ids(self._chat.render(pair.template_messages("chosen")), special=False)
                r = self._ids(self._chat.render(pair.template_messages("rejected")), special=False)
            except Exception as exc:  # noqa: BLE001 - a template that raises on this row's content
                raise RowError(f"the chat template failed on this pair ({type(exc).__name__}: {exc})") from None
        # where the prompt stops being a prefix (a template that renders it differently, a token
        # merged across the boundary), the answer starts where the sequences part, as in TRL
        n = min(_common_prefix(p, c), _common_prefix(p, r))
        encoded = EncodedPair(p[:n], c[n:], r[n:], pair.source_index)
        if not encoded.chosen_ids or not encoded.rejected_ids:
            raise RowError("an answer has no tokens after the prompt")
        if encoded.length > self.max_length:
            raise RowError(
                f"{TOO_LONG}: {encoded.length:,} tokens (prompt {len(encoded.prompt_ids):,} + longer answer "
                f"{max(len(encoded.chosen_ids), len(encoded.rejected_ids)):,}) > data.max_length "
                f"{self.max_length:,}; dropped, not truncated"
            )
        return encoded


@dataclass
class PreferenceSet:
    """The structural and tokenised passes over a preference source (shared by run and data check)."""

    raw: RawRows
    format: str
    report: ValidationReport
    pairs: list[PreferencePair]
    encoded: list[EncodedPair]

    @property
    def too_long(self) -> int:
        return sum(1 for p in self.report.problems if p.reason.startswith(TOO_LONG))


def read_preferences(section: DataSection, tokenizer, *, needs_chat_template: bool = True) -> PreferenceSet:
    raw = load_rows(section)
    fmt = resolve_preference_format(raw.columns, section.format, source=raw.source)
    pairs, problems = validate_pairs(raw, fmt, raw.errors)
    report = ValidationReport(source=raw.source, format=fmt, total_rows=len(raw))
    for problem in problems:
        report.add(problem.index, problem.reason)
    encoder = PairEncoder(tokenizer, section.max_length)
    if needs_chat_template and any(not p.is_text for p in pairs):
        encoder._chat.require_chat_template()
    encoded = []
    for pair in pairs:
        try:
            encoded.append(encoder.encode(pair))
        except RowError as exc:
            report.add(pair.source_index, str(exc))
    return PreferenceSet(raw, fmt, report, pairs, encoded)


@dataclass
class PreparedPreferences:
    train: "object"  # datasets.Dataset with prompt_ids, chosen_ids, rejected_ids
    eval: "object | None"
    report: ValidationReport
    stats: PreferenceStats
    format: str
    source: str
    source_kind: str
    max_length: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A small JSON-able summary (for the run_started event)."""
        return {
            "task": "dpo",
            "source": self.source,
            "source_kind": self.source_kind,
            "format": self.format,
            "max_length": self.max_length,
            "rows_read": self.report.total_rows,
            "rows_skipped": self.report.bad_rows,
            "rows": self.stats.pairs,
            "train_rows": self.stats.train_pairs,
            "eval_rows": self.stats.eval_pairs,
            "tokens": self.stats.tokens,
            "length_max": self.stats.pair_max,
            **{f"preference_{k}": v for k, v in self.stats.to_dict().items()},
            "problems": [p.to_dict() for p in self.report.problems[:5]],
            "warnings": list(self.warnings),
        }


def _to_dataset(encoded: list[EncodedPair]):
    from datasets import Dataset, Features, Sequence, Value

    ids = Sequence(Value("int32"))
    return Dataset.from_dict(
        {
            "prompt_ids": [e.prompt_ids for e in encoded],
            "chosen_ids": [e.chosen_ids for e in encoded],
            "rejected_ids": [e.rejected_ids for e in encoded],
        },
        features=Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids}),
    )


def too_long_warning(pairs: int, max_length: int, *, with_images: bool = False) -> str:
    """The run's warning for pairs the length policy dropped (text and vision DPO alike)."""
    what = " with their image tokens" if with_images else ""
    return f"{pairs:,} pair(s) longer than data.max_length = {max_length:,}{what} were dropped (never truncated)"


def prepare_preferences(preset: Preset, tokenizer) -> PreparedPreferences:
    """Everything the DPO trainer needs from `preset.data`, or a `DataError` the user can act on."""
    section = preset.data
    prefs = read_preferences(section, tokenizer)
    prefs.report.raise_if_too_many(section.max_bad_fraction)
    encoded = prefs.encoded
    if not encoded:  # pragma: no cover - raise_if_too_many stops at zero usable rows
        raise DataError("No usable preference pair", where=section.source)
    train, held = split_rows(encoded, section.eval_fraction, preset.train.seed)
    warnings = [too_long_warning(prefs.too_long, section.max_length)] if prefs.too_long else []
    return PreparedPreferences(
        train=_to_dataset(train),
        eval=_to_dataset(held) if held else None,
        report=prefs.report,
        stats=PreferenceStats.from_encoded(encoded, eval_pairs=len(held), too_long=prefs.too_long),
        format=prefs.format,
        source=prefs.raw.source,
        source_kind=prefs.raw.kind,
        max_length=section.max_length,
        warnings=warnings,
    )
