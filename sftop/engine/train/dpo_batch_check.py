"""DPO's batch check worked out on the host, where the collator builds the batch.

Why: the CUDA graphs of the DPO forwards need to know, before they choose a captured step, whether
a batch may run as unpadded and where its first scored position is
(`sftop.kernels.logprob_graphs.batch_check`).  Read back from the GPU, that is one host
synchronisation per micro-batch, after which the host launches the next work with the GPU idle;
the collated batch still lies in host memory, where the same check costs microseconds and no wait.

The collator wrapper adds the answer to the batch under `BATCH_CHECK_KEY` (a plain object, which
the device move of accelerate and Trainer passes through untouched); sftop's DPO trainer takes it
out before TRL sees the batch and hands it to the graphs for that micro-batch's forwards.  The
labels it is computed from are the ones TRL builds for both forwards,
`input_ids.masked_fill(completion_mask == 0, -100)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BATCH_CHECK_KEY = "sftop_batch_check"
SHARED_PROMPT_KEY = "sftop_shared_prompt"


@dataclass(frozen=True)
class HostBatchCheck:
    """`logprob_graphs.batch_check` of one collated batch: whether it may run as unpadded, and the
    first position (of the labels shifted for causal LM) any row scores."""

    ok: bool
    first: int


def host_batch_check(batch: dict) -> HostBatchCheck | None:
    """The check of a collated text DPO batch in host memory, or None when it cannot be worked out
    here (tensors already on a GPU, a batch without a completion mask)."""
    from sftop.kernels.logprob_graphs import batch_check

    ids, completion, mask = (batch.get(k) for k in ("input_ids", "completion_mask", "attention_mask"))
    tensors = [t for t in (ids, completion, mask) if t is not None]
    if ids is None or completion is None or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    if any(t.device.type != "cpu" for t in tensors) or ids.dim() != 2 or completion.shape != ids.shape:
        return None
    labels = ids.masked_fill(completion == 0, -100)
    ok, first = batch_check(labels, mask).tolist()
    return HostBatchCheck(bool(ok), int(first))


class BatchCheckingCollator:
    """A DPO collator whose batches carry their `HostBatchCheck` under BATCH_CHECK_KEY and, with
    `share_prompt` (dpo.share_prompt), the layout that runs each pair's prompt once under
    SHARED_PROMPT_KEY (sftop/kernels/shared_prompt.py), both worked out in host memory; any other
    attribute is the wrapped collator's."""

    def __init__(self, collator: Any, share_prompt: bool = False):
        self.collator = collator
        self.share_prompt = share_prompt

    def __call__(self, features):
        batch = self.collator(features)
        if isinstance(batch, dict):
            checked = host_batch_check(batch)
            if checked is not None:
                batch[BATCH_CHECK_KEY] = checked
            if self.share_prompt:
                layout = host_shared_prompt(batch)
                if layout is not None:
                    batch[SHARED_PROMPT_KEY] = layout
        return batch

    def __getattr__(self, name: str):
        if name == "collator":  # not set yet (a copy or unpickling in a loader worker)
            raise AttributeError(name)
        return getattr(self.collator, name)


def host_shared_prompt(batch: dict):
    """The shared-prompt layout of a collated text DPO batch in host memory, or None (tensors already
    on a GPU, images, pairs whose rows do not share their prompt)."""
    from sftop.kernels.shared_prompt import build_layout

    if any(k not in _TEXT_KEYS for k in batch):
        return None  # images (pixel values and their grids) or anything else the layout does not carry
    ids, completion, mask = (batch.get(k) for k in ("input_ids", "completion_mask", "attention_mask"))
    if ids is None or completion is None or mask is None:
        return None
    return build_layout(ids, mask, completion)


_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "completion_mask", BATCH_CHECK_KEY})


def take_batch_check(inputs: dict) -> tuple[dict, HostBatchCheck | None]:
    """The batch without the check (what TRL and the model get), and the check, if it carried one."""
    if BATCH_CHECK_KEY not in inputs:
        return inputs, None
    inputs = dict(inputs)
    return inputs, inputs.pop(BATCH_CHECK_KEY)


def take_shared_prompt(inputs: dict):
    """The batch without its shared-prompt layout, and the layout (None where it carried none)."""
    if SHARED_PROMPT_KEY not in inputs:
        return inputs, None
    inputs = dict(inputs)
    return inputs, inputs.pop(SHARED_PROMPT_KEY)
