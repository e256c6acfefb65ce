"""Packed plans sized for the data: the token split a run will use, and `sftop plan` reading the data.

`sftop run` sizes a packed plan from the prepared rows (runner.size_plan_for_data); `sftop plan`
does the same when it can read the data without a download (the tokenizer on disk), so that the
plan it shows is the one the run will start from: each step's rows split by tokens, with the
largest micro-batch of the run.
"""

from __future__ import annotations

import os
from typing import Any

from sftop.engine.planner.solve import Plan, SplitByTokens, size_for_data
from sftop.engine.planner.token_split import epochs_covered


def token_split_for(preset: Any, rows: int, effective_batch: int) -> SplitByTokens | None:
    """plan.split_by: token-balanced micro-batches for packed single-process runs unless "rows" is
    asked for; None keeps the Trainer's own order (b rows per micro-batch). The steps are of about
    equal tokens unless train.equal_token_steps is off: the runner's sampler reads the same key."""
    if getattr(preset.plan, "split_by", "auto") == "rows" or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return None
    train = preset.train
    return SplitByTokens(
        seed=train.seed,
        epochs=epochs_covered(rows, effective_batch, train.epochs, train.max_steps),
        balanced=equal_token_steps(preset),
    )


def equal_token_steps(preset: Any) -> bool:
    """train.equal_token_steps: the planner's split and the trainer's sampler both ask here."""
    return getattr(preset.train, "equal_token_steps", "on") == "on"


def bucket_multiple(preset: Any, graphs_on: bool = True) -> int:
    """The length the trainer pads packed micro-batches up to a multiple of (1 without buckets)."""
    from sftop.engine.train.buckets import BUCKET_MULTIPLE, buckets_wanted

    return BUCKET_MULTIPLE if buckets_wanted(preset.train.length_buckets, graphs_on) else 1


def sized_for_preset_data(plan: Plan, preset: Any) -> Plan:
    """`sftop plan`: a packed text plan sized for the preset's data, as `sftop run` will size it.

    Needs the tokenizer on disk (a local model, a built-in one or the hub cache: no download) and
    data that passes its check; otherwise the plan stays sized for max_length, with a note saying so.
    """
    if not plan.packing or plan.context is None or preset.train.task != "sft":
        return plan
    from sftop.engine.models.tokenizer import resolve_model_source

    source = resolve_model_source(preset.model)
    if not _tokenizer_on_disk(source, preset.model.revision):
        plan.notes.append(
            "sized for data.max_length: the model's tokenizer is not on this machine; `sftop run` "
            "sizes packed micro-batches for the rows themselves"
        )
        return plan
    try:
        from transformers import AutoTokenizer

        from sftop.engine.data import prepare_data
        from sftop.engine.models.tokenizer import ensure_pad_token

        tokenizer = ensure_pad_token(
            AutoTokenizer.from_pretrained(
                source,
                revision=preset.model.revision,
                trust_remote_code=preset.model.trust_remote_code,
                local_files_only=True,
            )
        )
        data = prepare_data(preset, tokenizer)
        lengths = [len(ids) for ids in data.train["input_ids"]]
    except Exception as exc:  # noqa: BLE001 - the plan without the data is still a plan
        plan.notes.append(
            "sized for data.max_length: the data could not be read here "
            f"({type(exc).__name__}: {str(exc)[:160]}); `sftop run` sizes it for the rows themselves"
        )
        return plan
    sized = size_for_data(
        plan,
        lengths,
        bucket_multiple(preset),
        # several processes split each step by rows (the Trainer's own sharding)
        split=None if plan.world_size > 1 else token_split_for(preset, len(lengths), plan.effective_batch),
    )
    sized.notes.append(f"sized for the data: {len(lengths):,} training rows read, as `sftop run` will size them")
    return sized


def _tokenizer_on_disk(source: str, revision: str | None) -> bool:
    """Whether the tokenizer loads without the network: a local directory with its files, or the hub cache."""
    from pathlib import Path

    names = ("tokenizer_config.json", "tokenizer.json")
    if Path(source).is_dir():
        return any((Path(source) / name).is_file() for name in names)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(source, name, revision=revision), str) for name in names)
