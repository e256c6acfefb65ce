"""The data pipeline's entry point for the trainer: `prepare_data(preset, tokenizer)`.

source -> rows -> format detection -> structural validation -> chat template + masks -> length
validation -> train/eval split -> `datasets.Dataset` with `input_ids` and `labels` (-100 where not
trained). TRL's SFTTrainer takes such a dataset as it is (it sees `input_ids` and skips its own
tokenisation, keeps our `labels`, and can pack it). Leave `assistant_only_loss` and
`completion_only_loss` off in SFTConfig: the labels already carry the mask.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, TypeVar

from sftop.engine.data.conversation import Conversation
from sftop.engine.data.formats import RowError
from sftop.engine.data.sources import RawRows, load_rows
from sftop.engine.data.tokenize import IGNORE_INDEX, Encoded, Encoder
from sftop.engine.data.validate import ValidationReport, resolve_format, validate_rows
from sftop.engine.presets.schema import DataSection, Preset


T = TypeVar("T")


class EncodedRow(Protocol):
    """What the statistics read of an encoded row (a text `Encoded` or a vision row)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def trained_tokens(self) -> int: ...


@dataclass
class DataStats:
    rows: int  # usable rows (train + eval)
    train_rows: int
    eval_rows: int
    tokens: int  # over usable rows
    trained_tokens: int
    length_p50: int
    length_p90: int
    length_p99: int
    length_max: int

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["trained_share"] = round(self.trained_share, 4)
        return out

    @classmethod
    def from_encoded(cls, encoded: Sequence[EncodedRow], eval_rows: int = 0) -> "DataStats":
        lengths = sorted(len(e.input_ids) for e in encoded)
        return cls(
            rows=len(encoded),
            train_rows=len(encoded) - eval_rows,
            eval_rows=eval_rows,
            tokens=sum(lengths),
            trained_tokens=sum(e.trained_tokens for e in encoded),
            length_p50=_percentile(lengths, 50),
            length_p90=_percentile(lengths, 90),
            length_p99=_percentile(lengths, 99),
            length_max=lengths[-1] if lengths else 0,
        )


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile: always a length that some row really has."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


@dataclass
class Structured:
    """The result of the structural pass (no tokenizer needed)."""

    raw: RawRows
    format: str
    conversations: list[Conversation]
    report: ValidationReport


@dataclass
class Encoding:
    structured: Structured
    encoded: list[Encoded] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def report(self) -> ValidationReport:
        return self.structured.report


def validate_structure(section: DataSection, *, strict: bool = True, allow_images: bool = False) -> Structured:
    """Read the source and check every row's structure; runs before any model is loaded.

    With `strict`, raises `DataError` when more than `data.max_bad_fraction` of the rows are bad.
    `allow_images`: the model reads images (rows holding them are not bad rows; their images are
    checked by `image_check.check_structured_images`).
    """
    from sftop.engine.data.columns import map_columns

    raw = map_columns(load_rows(section), section.columns)
    fmt = resolve_format(raw, section.format)
    conversations, report = validate_rows(raw, fmt, section.loss_on, allow_images=allow_images)
    if strict:
        report.raise_if_too_many(section.max_bad_fraction)
    return Structured(raw, fmt, conversations, report)


def encode_structured(
    structured: Structured, section: DataSection, tokenizer, *, workers: int | None = None
) -> Encoding:
    """Tokenise the rows that passed the structural pass; rows that fail here join the report.

    `workers`: processes to encode with; None picks by size (one for small sets, where starting
    processes costs more than it saves).
    """
    encoder = Encoder(tokenizer, loss_on=section.loss_on, max_length=section.max_length)
    if any(not c.is_document for c in structured.conversations):
        encoder.require_chat_template()
    result = Encoding(structured)
    outcomes = _encode_parallel(encoder, structured.conversations, workers)
    for conv, outcome in zip(structured.conversations, outcomes):
        if isinstance(outcome, RowError):
            structured.report.add(conv.source_index, str(outcome))
        else:
            result.encoded.append(outcome)
    result.warnings = _warnings(result.encoded, encoder, section, structured.format)
    return result


PARALLEL_MIN_ROWS = 20_000


def _encode_chunk(encoder: Encoder, convs: list[Conversation]) -> list:
    return list(encoder.encode_many(convs))


def _encode_parallel(encoder: Encoder, convs: list[Conversation], workers: int | None) -> list:
    """`encoder.encode_many(convs)`, spread over processes for big datasets (chat templates render in Python)."""
    if workers is None:
        # Only from the main thread: forking while other threads (a TUI's workers) hold locks can
        # leave a child stuck on a lock nobody will release.
        big = len(convs) >= PARALLEL_MIN_ROWS and threading.current_thread() is threading.main_thread()
        workers = min(8, (os.cpu_count() or 1) - 1) if big else 1
    if workers <= 1 or len(convs) < 2:
        return list(encoder.encode_many(convs))
    size = max(256, -(-len(convs) // (workers * 4)))
    chunks = [convs[i : i + size] for i in range(0, len(convs), size)]
    if "fork" not in multiprocessing.get_all_start_methods():
        return list(encoder.encode_many(convs))
    # fork, as datasets.map(num_proc=...) does: spawn would re-import the caller's main module
    # (a training script) in every worker. The workers only tokenise; they never touch CUDA.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the forked workers' own setting; avoids a warning each
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return [outcome for part in pool.map(_encode_chunk, [encoder] * len(chunks), chunks) for outcome in part]
    except (OSError, pickle.PicklingError, BrokenProcessPool):
        # No processes to be had (sandbox limits, a worker killed): the same work, one process.
        return list(encoder.encode_many(convs))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _warnings(encoded: list[Encoded], encoder: Encoder, section: DataSection, fmt: str) -> list[str]:
    """Dataset-wide concerns that do not make any single row bad."""
    warnings = []
    if fmt != "text" and section.loss_on == "assistant" and encoded:
        ends = []
        for row in encoded[:200]:
            labels = row.labels
            ends += [
                row.input_ids[t]
                for t in range(len(labels))
                if labels[t] != IGNORE_INDEX and (t + 1 == len(labels) or labels[t + 1] == IGNORE_INDEX)
            ]
        if ends and not any(token in encoder.special_ids for token in ends):
            warnings.append(
                "The chat template closes assistant turns without a special end-of-turn token, so the model "
                "may not learn where to stop answering; prefer a model whose template ends turns with one"
            )
    return warnings


def split_eval(n: int, fraction: float, seed: int) -> list[int]:
    """Indices (sorted) of the rows held out for evaluation; same seed, same rows."""
    if fraction <= 0 or n < 2:
        return []
    count = min(n - 1, max(1, round(n * fraction)))
    return sorted(random.Random(seed).sample(range(n), count))


def split_rows(rows: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """The rows trained on and the rows held out (those `split_eval` picks), each in source order."""
    held = set(split_eval(len(rows), fraction, seed))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels (datasets is not type-checked: Any)
    eval: Any  # the same, or None
    report: ValidationReport
    stats: DataStats
    format: str
    source: str
    source_kind: str
    loss_on: str
    max_length: int
    warnings: list[str] = field(default_factory=list)
    train_source_rows: list[int] = field(default_factory=list)  # source row index per train row
    eval_source_rows: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A small JSON-able summary (for the run_started event)."""
        return {
            "source": self.source,
            "source_kind": self.source_kind,
            "format": self.format,
            "loss_on": self.loss_on,
            "max_length": self.max_length,
            "rows_read": self.report.total_rows,
            "rows_skipped": self.report.bad_rows,
            **self.stats.to_dict(),
            "problems": [p.to_dict() for p in self.report.problems[:5]],
            "warnings": list(self.warnings),
        }


def _to_dataset(encoded: list[Encoded]):
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]},
        features=features,
    )


def prepare_data(preset: Preset, tokenizer, *, structured: Structured | None = None) -> PreparedData:
    """Everything the trainer needs from `preset.data`, or a `DataError` the user can act on.

    Pass the result of an earlier `validate_structure(preset.data)` (run before the model was
    loaded, to fail fast) as `structured` to skip reading the source again.
    """
    section = preset.data
    if structured is None:
        structured = validate_structure(section, strict=True)
    encoding = encode_structured(structured, section, tokenizer)
    report = encoding.report
    report.raise_if_too_many(section.max_bad_fraction)
    encoded = encoding.encoded
    train_rows, eval_rows = split_rows(encoded, section.eval_fraction, preset.train.seed)
    return PreparedData(
        train=_to_dataset(train_rows),
        eval=_to_dataset(eval_rows) if eval_rows else None,
        report=report,
        stats=DataStats.from_encoded(encoded, eval_rows=len(eval_rows)),
        format=structured.format,
        source=structured.raw.source,
        source_kind=structured.raw.kind,
        loss_on=section.loss_on,
        max_length=section.max_length,
        warnings=encoding.warnings,
        train_source_rows=[e.source_index for e in train_rows],
        eval_source_rows=[e.source_index for e in eval_rows],
    )
