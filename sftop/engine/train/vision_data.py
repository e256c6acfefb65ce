"""The training data of a vision-language run: checked rows, exact lengths, and the batch collator.

source -> rows normalised with their images (`sftop.engine.data`) -> every image opened, checked
and resized to the family's pixel budget (bad rows named, skipped and counted) -> each row encoded
without pixels by the family collator, which gives its exact length with all its image tokens ->
rows longer than `data.max_length` dropped and counted (never cut through their image tokens) ->
train/eval split. The dataset handed to TRL holds one row index per row; the collator resolves
the row's images again when its batch is built (decoding is cheap next to a step, and a large
dataset's images never all sit in memory at once), then builds the inputs through the processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from sftop.engine.data.conversation import Conversation, ImagePart, Message
from sftop.engine.data.formats import RowError
from sftop.engine.data.prepare import DataStats, PreparedData, split_rows, validate_structure
from sftop.engine.models.vision.family import VisionFamily


class _SizeOnly:
    """Stands in for an image whose size is known: the collator's row encoding reads only `.size`."""

    __slots__ = ("size",)

    def __init__(self, size: tuple[int, int]):
        self.size = tuple(size)


def _with_sizes(conv: Conversation, sizes: Sequence[tuple[int, int]]) -> Conversation:
    it = iter(sizes)
    messages = tuple(
        Message(m.role, tuple(ImagePart(_SizeOnly(next(it))) if isinstance(p, ImagePart) else p for p in m.content))
        for m in conv.messages
    )
    return Conversation(messages=messages, document=conv.document, source_index=conv.source_index)


@dataclass
class VisionBatches:
    """TRL's `data_collator`: row indices in, the family collator's tensors out."""

    conversations: list[Conversation]
    collator: Any  # sftop.engine.models.vision.collator.VisionCollator
    base_dir: Any
    rules: Any

    def __call__(self, items: Sequence[dict]) -> dict:
        from sftop.engine.data.image_check import resolve_row_images

        convs = [resolve_row_images(self.conversations[int(item["row"])], self.base_dir, self.rules) for item in items]
        return self.collator(convs)


@dataclass
class VisionPreparedData(PreparedData):
    """`PreparedData` of a VLM run: `train`/`eval` hold row indices; `collator` builds the batches."""

    collator: Any = None
    image_tokens_per_row: list[int] = field(default_factory=list)  # train + eval rows, for the planner
    images_per_row: list[int] = field(default_factory=list)
    train_lengths: list[int] = field(default_factory=list)  # tokens of each train row, images included (packing)

    def to_dict(self) -> dict:
        data = super().to_dict()
        tokens = sorted(self.image_tokens_per_row)
        total = sum(tokens)
        data["images"] = {
            "rows_with_images": sum(1 for n in self.images_per_row if n),
            "images": sum(self.images_per_row),
            "max_images_per_row": max(self.images_per_row, default=0),
            "image_tokens_p95_per_row": tokens[max(0, -(-len(tokens) * 95 // 100) - 1)] if tokens else 0,
            "image_tokens_max_per_row": tokens[-1] if tokens else 0,
            "image_token_share": round(total / self.stats.tokens, 4) if self.stats.tokens else 0.0,
        }
        return data


def _index_dataset(indices: list[int]):
    from datasets import Dataset

    return Dataset.from_dict({"row": list(indices)})


def prepare_vision_data(preset, processor, family: VisionFamily) -> VisionPreparedData:
    """Everything the trainer needs from `preset.data` for a VLM, or a `DataError` the user can act on."""
    from sftop.engine.data.image_check import check_structured_images
    from sftop.engine.data.images import effective_image_rules
    from sftop.engine.data.vision_rows import dataset_base_dir
    from sftop.engine.models.vision.collator import VisionCollator

    section = preset.data
    rules = effective_image_rules(family.image_rules, section)
    structured = validate_structure(section, strict=True, allow_images=True)
    check = check_structured_images(structured, rules, keep_images=False)
    report = structured.report
    collator = VisionCollator(family, processor, loss_on=section.loss_on, max_length=section.max_length, rules=rules)
    rows, kept = [], []
    for conv, sizes in zip(check.conversations, check.sizes):
        try:
            encoded = collator.encode_row(_with_sizes(conv, [final for _original, final in sizes]))
        except RowError as exc:  # too long with its image tokens, nothing to train on, ...
            report.add(conv.source_index, str(exc))
            continue
        rows.append(encoded)
        kept.append(conv)
    report.raise_if_too_many(section.max_bad_fraction)
    train_idx, eval_idx = split_rows(list(range(len(rows))), section.eval_fraction, preset.train.seed)
    base_dir = dataset_base_dir(structured.raw.source, structured.raw.kind)
    return VisionPreparedData(
        # one collator for both: the datasets hold indices into all kept rows
        train=_index_dataset(train_idx),
        eval=_index_dataset(eval_idx) if eval_idx else None,
        report=report,
        stats=DataStats.from_encoded(rows, eval_rows=len(eval_idx)),
        format=structured.format,
        source=structured.raw.source,
        source_kind=structured.raw.kind,
        loss_on=section.loss_on,
        max_length=section.max_length,
        train_source_rows=[rows[i].source_index for i in train_idx],
        eval_source_rows=[rows[i].source_index for i in eval_idx],
        collator=VisionBatches(kept, collator, base_dir, rules),
        image_tokens_per_row=[r.image_tokens for r in rows],
        images_per_row=[len(r.image_sizes) for r in rows],
        train_lengths=[rows[i].length for i in train_idx],
    )


def image_tokens_for_plan(preset) -> list[int] | None:
    """`sftop plan`'s image load: the data check's exact image tokens per row for a VLM whose
    family can be told offline (built-in, local directory, cached hub model); None otherwise."""
    from sftop.engine.models.vision.detect import family_on_disk
    from sftop.engine.models.vision.loading import load_processor

    family = family_on_disk(preset.model.name)
    if family is None:
        return None
    prepare = prepare_vision_data
    if preset.train.task == "dpo":
        from sftop.engine.train.vision_dpo_data import prepare_vision_preferences as prepare
    return prepare(preset, load_processor(preset.model, family), family).image_tokens_per_row


def vision_check_kwargs(preset) -> dict:
    """`check_data`'s arguments for a VLM told offline: its processor's tokenizer, the family's image
    rules with the preset's pixel budget, and the family's exact image-token count. {} otherwise."""
    from sftop.engine.data.images import effective_image_rules
    from sftop.engine.models.vision.detect import family_on_disk
    from sftop.engine.models.vision.loading import load_processor

    family = family_on_disk(preset.model.name)
    if family is None:
        return {}
    processor = load_processor(preset.model, family)
    return {
        "tokenizer": processor.tokenizer,
        "image_rules": effective_image_rules(family.image_rules, preset.data),
        "image_tokens": lambda width, height: family.image_token_count(processor, width, height),
    }
