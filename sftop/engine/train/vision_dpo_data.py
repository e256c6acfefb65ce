"""The training data of a vision-language DPO run: preference pairs with images, checked, measured, collated.

source -> `PreferencePair`s (`sftop.engine.data.preferences`: images in an `images`/`image` column
with `{"type": "image"}` placeholders, or inline in the prompt's parts) -> the pair's prompt as a
conversation with its images placed as for SFT rows (`vision_rows.attach_images`) -> every image
opened, checked and resized to the family's pixel budget (`image_check`; the first bad image names
the pair, which is skipped and counted) -> prompt + chosen and prompt + rejected encoded without
pixels by the family collator (`VisionCollator.encode_row`), which gives each side's exact length
with all its image tokens -> the length policy of text DPO (a pair whose longer side exceeds
`data.max_length` is dropped, never truncated: cutting through image tokens breaks the row, and a
cut answer teaches the model to prefer half a sentence) -> train/eval split.

The trainer's dataset holds pair indices.  `VisionPreferenceBatches` builds each batch as TRL's
`DPOTrainer` reads it: the rows [chosen of every pair; rejected of every pair] collated by the
family collator (the processor makes `pixel_values` and the rest, each pair's images once per
side, as TRL's own vision collator does), and `completion_mask` marking the answer tokens.  The
answer is what the collator trains on with `loss_on = "assistant"`, less the assistant turns the
prompt itself holds (a multi-turn prompt's earlier answers are context, not preference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sftop.engine.data.conversation import Conversation
from sftop.engine.data.formats import RowError
from sftop.engine.data.preference_prepare import TOO_LONG, EncodedPair, PreferenceStats
from sftop.engine.data.preferences import PreferencePair, resolve_preference_format, validate_pairs
from sftop.engine.data.tokenize import IGNORE_INDEX
from sftop.engine.data.validate import ValidationReport
from sftop.engine.models.vision.family import VisionFamily
from sftop.engine.train.vision_data import VisionPreparedData, _index_dataset, _with_sizes


@dataclass(frozen=True)
class ImagePair:
    """A pair ready for the collator: the prompt with its images placed (references, resolved per
    batch), each side's answer messages, and how many assistant turns the prompt holds."""

    prompt: Conversation
    chosen: tuple
    rejected: tuple
    prompt_answers: int
    source_index: int

    def side(self, prompt: Conversation, which: str) -> Conversation:
        return Conversation(messages=prompt.messages + getattr(self, which), source_index=self.source_index)


def prompt_conversation(pair: PreferencePair) -> Conversation:
    """The pair's prompt with the pair's image column placed in it (placeholders filled in order, or
    all images before the first user turn's text); raises `RowError` when they do not match."""
    from sftop.engine.data.vision_rows import attach_images, images_in_cell

    conv = Conversation(messages=tuple(pair.prompt), source_index=pair.source_index)
    images = images_in_cell(list(pair.images), "images") if pair.images else []
    for side in ("chosen", "rejected"):
        if any(m.has_image for m in getattr(pair, side)):
            raise RowError(f"`{side}` holds an image: the images of a preference pair belong to its prompt")
    return attach_images(conv, images, column="images" if pair.images else None)


def answer_mask(labels: Sequence[int], prompt_answers: int) -> list[bool]:
    """The tokens of the pair's answer: trained tokens after the prompt's own assistant turns.

    The collator trains each assistant turn as one run of tokens (its text and end-of-turn token;
    image tokens never sit in an answer, see `prompt_conversation`), so the prompt's turns are the
    first `prompt_answers` runs.
    """
    runs, previous, mask = 0, False, []
    for label in labels:
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs += 1
        mask.append(trained and runs > prompt_answers)
        previous = trained
    return mask


def _split(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    start = mask.index(True) if True in mask else len(ids)
    return ids[:start], ids[start:]


@dataclass
class VisionPreferenceSet:
    """The checked and measured pairs of a source (shared by the run and `sftop data check`)."""

    raw: Any
    format: str
    report: ValidationReport
    pairs: list[ImagePair]
    encoded: list[EncodedPair]
    image_tokens: list[int]  # per kept pair (one side's images: both sides show the same)
    image_sizes: list[list[tuple[tuple[int, int], tuple[int, int]]]]  # per kept pair: (original, final)

    @property
    def too_long(self) -> int:
        return sum(1 for p in self.report.problems if p.reason.startswith(TOO_LONG))


def read_vision_preferences(section, processor, family: VisionFamily) -> tuple[VisionPreferenceSet, Any]:
    """Every pair of `section.source` read, its images checked, both sides measured; bad pairs are
    recorded in the report by row index.  Returns the set and the collator (configured processor)."""
    from sftop.engine.data.image_check import load_row_images
    from sftop.engine.data.images import effective_image_rules
    from sftop.engine.data.sources import load_rows
    from sftop.engine.data.vision_rows import dataset_base_dir
    from sftop.engine.models.vision.collator import VisionCollator

    raw = load_rows(section)
    fmt = resolve_preference_format(raw.columns, section.format, source=raw.source)
    found, problems = validate_pairs(raw, fmt, raw.errors)
    report = ValidationReport(source=raw.source, format=fmt, total_rows=len(raw))
    for problem in problems:
        report.add(problem.index, problem.reason)
    rules = effective_image_rules(family.image_rules, section)
    # the length policy is the pair's (below), so the collator itself cuts nothing
    collator = VisionCollator(family, processor, loss_on="assistant", max_length=None, rules=rules)
    base_dir = dataset_base_dir(raw.source, raw.kind)
    result = VisionPreferenceSet(raw, fmt, report, [], [], [], [])
    for pair in found:
        try:
            if pair.is_text:
                raise RowError("raw-text pairs (no messages) cannot hold images; use prompt/chosen/rejected messages")
            prompt = prompt_conversation(pair)
            imaged = load_row_images(prompt, base_dir, rules)
            image_pair = ImagePair(
                prompt,
                pair.chosen,
                pair.rejected,
                sum(1 for m in pair.prompt if m.role == "assistant"),
                pair.source_index,
            )
            sized = _with_sizes(prompt, [final for _original, final in imaged.sizes])
            rows = [collator.encode_row(image_pair.side(sized, which)) for which in ("chosen", "rejected")]
            (prompt_ids, chosen_ids), (_, rejected_ids) = (
                _split(row.input_ids, answer_mask(row.labels, image_pair.prompt_answers)) for row in rows
            )
            if not chosen_ids or not rejected_ids:
                raise RowError("an answer has no tokens after the prompt")
            encoded = EncodedPair(prompt_ids, chosen_ids, rejected_ids, pair.source_index)
            if encoded.length > section.max_length:
                raise RowError(
                    f"{TOO_LONG}: {encoded.length:,} tokens ({rows[0].image_tokens:,} of them for "
                    f"{len(imaged.images)} image(s); prompt {len(prompt_ids):,} + longer answer "
                    f"{max(len(chosen_ids), len(rejected_ids)):,}) > data.max_length {section.max_length:,}; "
                    "dropped, not truncated (raise data.max_length or lower data.max_pixels)"
                )
        except RowError as exc:
            report.add(pair.source_index, str(exc))
            continue
        result.pairs.append(image_pair)
        result.encoded.append(encoded)
        result.image_tokens.append(rows[0].image_tokens)
        result.image_sizes.append(imaged.sizes)
    return result, collator


@dataclass
class VisionPreferenceBatches:
    """TRL's `data_collator` for vision DPO: pair indices in, [chosen rows; rejected rows] out."""

    pairs: list[ImagePair]
    collator: Any  # sftop.engine.models.vision.collator.VisionCollator
    base_dir: Any
    rules: Any

    def __call__(self, items: Sequence[dict]) -> dict:
        import torch

        from sftop.engine.data.image_check import resolve_row_images

        pairs = [self.pairs[int(item["row"])] for item in items]
        prompts = [resolve_row_images(p.prompt, self.base_dir, self.rules) for p in pairs]  # decoded once per pair
        sides = [p.side(prompt, "chosen") for p, prompt in zip(pairs, prompts)]
        sides += [p.side(prompt, "rejected") for p, prompt in zip(pairs, prompts)]
        batch = self.collator(sides)
        labels = batch.pop("labels")
        turns = [p.prompt_answers for p in pairs] * 2
        batch["completion_mask"] = torch.tensor(
            [answer_mask(row, k) for row, k in zip(labels.tolist(), turns)], dtype=torch.long
        )
        return batch


@dataclass
class VisionPreparedPreferences(VisionPreparedData):
    """`VisionPreparedData` of a VLM DPO run: `train`/`eval` hold pair indices."""

    preference: PreferenceStats | None = None

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["task"] = "dpo"
        if self.preference is not None:
            data.update({f"preference_{k}": v for k, v in self.preference.to_dict().items()})
        return data


def prepare_vision_preferences(preset, processor, family: VisionFamily) -> VisionPreparedPreferences:
    """Everything a VLM DPO run needs from `preset.data`, or a `DataError` the user can act on."""
    from sftop.engine.data.images import effective_image_rules
    from sftop.engine.data.preference_prepare import too_long_warning
    from sftop.engine.data.prepare import split_rows
    from sftop.engine.data.vision_rows import dataset_base_dir

    section = preset.data
    prefs, collator = read_vision_preferences(section, processor, family)
    prefs.report.raise_if_too_many(section.max_bad_fraction)
    train_idx, eval_idx = split_rows(list(range(len(prefs.pairs))), section.eval_fraction, preset.train.seed)
    stats = PreferenceStats.from_encoded(prefs.encoded, eval_pairs=len(eval_idx), too_long=prefs.too_long)
    warnings = [too_long_warning(prefs.too_long, section.max_length, with_images=True)] if prefs.too_long else []
    return VisionPreparedPreferences(
        train=_index_dataset(train_idx),
        eval=_index_dataset(eval_idx) if eval_idx else None,
        report=prefs.report,
        stats=_pair_stats(prefs.encoded, stats),
        format=prefs.format,
        source=prefs.raw.source,
        source_kind=prefs.raw.kind,
        loss_on="answers",
        max_length=section.max_length,
        train_source_rows=[prefs.pairs[i].source_index for i in train_idx],
        eval_source_rows=[prefs.pairs[i].source_index for i in eval_idx],
        collator=VisionPreferenceBatches(
            prefs.pairs,
            collator,
            dataset_base_dir(prefs.raw.source, prefs.raw.kind),
            effective_image_rules(family.image_rules, section),
        ),
        image_tokens_per_row=list(prefs.image_tokens),
        images_per_row=[len(s) for s in prefs.image_sizes],
        preference=stats,
        warnings=warnings,
    )


def _pair_stats(encoded: list[EncodedPair], stats: PreferenceStats):
    """SFT's `DataStats` of the pairs (lengths: prompt + the longer answer), for the run's summary."""
    from sftop.engine.data.prepare import DataStats, _percentile

    lengths = sorted(e.length for e in encoded)
    return DataStats(
        rows=stats.pairs,
        train_rows=stats.train_pairs,
        eval_rows=stats.eval_pairs,
        tokens=stats.tokens,
        trained_tokens=stats.answer_tokens,
        length_p50=_percentile(lengths, 50),
        length_p90=_percentile(lengths, 90),
        length_p99=_percentile(lengths, 99),
        length_max=stats.pair_max,
    )
