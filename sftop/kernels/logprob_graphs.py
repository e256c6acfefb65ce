"""CUDA graphs for preference tuning's log-prob forwards: DPO's policy forward (with its backward)
and its reference forward (adapter off, no gradient), each replayed once its shape repeats.

Why: the DPO step was host-bound.  Llama-3.2-1B, 2 pairs x 1024 tokens per side, LoRA r=16 on an
H100 (benchmarks/dpo_step.py --profile): the GPU was busy 68.8 ms of a 193.4 ms step, the rest
Python launching the kernels of two forwards and a backward.  SFT removes exactly this with its
captured step (cuda_graphs.py); this module gives the log-prob head the same mechanism.

What a graph holds: the backbone, then the fused linear log-prob kernel over EVERY position of the
batch, returning per-token log-probabilities [B, T] (the one output with a gradient) and the
metrics TRL reads (entropy, mean logit, top-1), all computed inside the graph.  The eager head
gathers the positions whose label counts (`hidden[mask]`), which needs the host to know how many
there are; here a position labelled -100 gets log-probability 0 and no gradient, which is what
the eager head's scatter gives it.  To spare the LM head most prompt positions, scoring starts at
the middle of the batch length when no row scores a position before it (read back
with the padding check below, and part of the key), and positions before it read zero.

Padding: TRL 1.16's text collator (`DataCollatorForPreference`) builds each row as prompt +
completion and pads on the right.  Under causal attention a right pad never changes a real
token's output, so a right-padded batch runs as if unpadded (an all-ones mask; its pad labels are
-100 already): exact.  The batch length is then padded on the device up to a multiple of
`LENGTH_MULTIPLE` (pad ids 0, labels -100) so that batches of nearby lengths share a graph; the
outputs are cut back to the batch's own length, so padding never reaches logps, metrics or token
counts.  A left-padded batch (TRL's vision collator pads prompts on the left), a mask that is not
0/1, a counted label under padding, or any other input (images, position ids, embeddings) runs
eagerly, exactly as before.

Host reads: at most one per micro-batch, the check above together with the first scored position.
A second call with the very same tensors reuses the answer, and so does any call while
`labels_from_one_batch` is active with the same token ids and mask: TRL builds the labels afresh
for the reference forward and the policy's (`input_ids.masked_fill(completion_mask == 0, -100)`
both times, as sftop's DPO loss does), so sftop's DPO trainer runs a micro-batch's forwards inside
it.  Without it the policy's read waited for the reference replay, and the host could not queue
the policy's forward meanwhile.  sftop's DPO collator works the check out on the host from the
collated batch (sftop/engine/train/dpo_batch_check.py) and hands it in, so that the reference's
read goes too: each read makes the host wait for the GPU to drain, and what the host does next runs
with the GPU idle.

Keys: everything `cuda_graphs.py` keys on, the scoring start, whether gradients are on, and every adapter layer's
state (disabled, merged, which adapters are active).  PEFT's `disable_adapter()` flips
`disable_adapters` on each LoRA layer (and their `requires_grad`), and sftop's LoRA kernels choose
their path per call from that state, so the reference forward has its own graph, captured and
replayed with the adapter off.  Both share one memory pool (`cuda_graphs.StepGraphs`), which holds
the larger of the two steps' transients instead of both: sftop's DPO trainer runs the reference
forward before the policy's (TRL runs it between the policy's forward and its backward, where a
replay in the shared pool would overwrite the policy's saved activations, so a reference forward
called there runs eagerly).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .constants import DPO_GRAPH_LENGTH_MULTIPLE, GRAPH_LOGPROB_CHUNK_BYTES
from .cuda_graphs import ENV_SWITCH, StepGraphs, enabled_by_env, no_rng_stash, token_ids_only
from .graph_layout import ModelLayout, keyed_slots
from .graph_layout import adapter_state as adapter_state  # read here by callers and tests
from .patching import markers as M

IGNORE_INDEX = -100
# batch lengths are padded up to a multiple of this on the device: tensor-core friendly, and few
# enough shapes that they repeat (a 2,048-token limit gives 8 lengths)
LENGTH_MULTIPLE = DPO_GRAPH_LENGTH_MULTIPLE
# captured steps per model: policy and reference for each of 8 lengths; later shapes run eagerly
MAX_KEYS = 16
# one chunk's logits in the graphed head (constants.GRAPH_LOGPROB_CHUNK_BYTES says why it is small);
# read at capture time, so a benchmark may compare sizes (benchmarks/dpo_step.py --graph-chunk-mib)
CHUNK_BYTES = GRAPH_LOGPROB_CHUNK_BYTES


class LogprobGraphs:
    """The captured log-prob steps of one model, and the last batch check (shared by the policy and
    reference forwards of a step)."""

    def __init__(self, lm: nn.Module):
        self.owner = lm.__dict__.get(M.GRAPHS)  # the cuda_graphs part's object: a re-patch starts afresh
        self.steps = StepGraphs(no_rng_stash(lm), max_keys=MAX_KEYS)
        self._checked: tuple | None = None
        self.layout = ModelLayout(lm)

    # The parameters and adapter layers are listed once (graph_layout.py): listing them per call
    # costs several ms of host time at the start of a step while the GPU waits.
    def rescan(self, lm: nn.Module) -> bool:
        """List the parameters and adapter layers afresh; True when the layout changed."""
        return self.layout.rescan(lm)

    def slots(self) -> list | None:
        """(module, name, parameter) of every parameter, looked up now; None when the list may be stale."""
        return self.layout.slots()

    def adapter_state(self) -> tuple:
        return self.layout.adapter_state()

    def first_scored(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None,
        one_batch: bool = False,
        known=None,
    ) -> int | None:
        """The first position any row scores (see `batch_check`), or None when the batch must run
        eagerly.  A call with the very tensors of the last one reuses its answer instead of reading
        the device again; with `one_batch` (labels_from_one_batch) the same token ids and mask
        suffice, the labels being built from them the same way.  `known`: the batch's check worked
        out on the host (its `ok` and `first`), taken instead of a read."""
        tensors = (ids, labels, mask)
        versions = tuple(None if t is None else t._version for t in tensors)
        c = self._checked
        if c is not None:
            same = [a is b and va == vb for a, b, va, vb in zip(c[0], tensors, c[1], versions)]
            if all(same) or (one_batch and same[0] and same[2] and c[0][1].shape == labels.shape):
                return c[2]
        if known is not None:
            ok, first = known.ok, known.first
        else:
            ok, first = batch_check(labels, mask).tolist()  # a host read: the GPU drains first
        answer = int(first) if ok else None
        self._checked = (tensors, versions, answer)
        return answer


@contextlib.contextmanager
def labels_from_one_batch(lm: nn.Module, known=None):
    """While active, every log-prob forward of `lm` with the same token ids and mask takes labels
    built from them the same way (one DPO micro-batch's reference and policy forwards): the graphs
    read the batch check once for all of them (see the module docstring).  `known`: that check
    already worked out on the host from the collated batch (an object with `ok` and `first`, as
    sftop/engine/train/dpo_batch_check.py makes), so that no forward reads the device for it."""
    previous = lm.__dict__.get(M.LABELS_FROM_ONE_BATCH)
    lm.__dict__[M.LABELS_FROM_ONE_BATCH] = _OneBatch(known)
    try:
        yield
    finally:
        if previous is None:
            lm.__dict__.pop(M.LABELS_FROM_ONE_BATCH, None)
        else:
            lm.__dict__[M.LABELS_FROM_ONE_BATCH] = previous


class _OneBatch:
    """What labels_from_one_batch leaves on the model while it is active."""

    def __init__(self, known):
        self.known = known


def batch_check(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Two device integers: whether the batch may run as unpadded (every row of `mask` is ones then
    zeros, 0/1 only, and no label under padding counts: then an all-ones mask gives every real token
    the same output), and the first position (of the labels shifted for causal LM) any row scores."""
    counted = labels[:, 1:] != IGNORE_INDEX
    # the first True column; 0 when nothing counts
    first = counted.any(dim=0).to(torch.int32).argmax()
    ok = torch.ones((), dtype=torch.bool, device=labels.device)
    if mask is not None:
        ok = ((mask == 0) | (mask == 1)).all() & (mask[:, 1:] <= mask[:, :-1]).all()
        ok = ok & ~((labels != IGNORE_INDEX) & (mask == 0)).any()
    return torch.stack([ok.to(torch.int64), first.to(torch.int64)])


def padded_length(tokens: int, multiple: int = LENGTH_MULTIPLE) -> int:
    return -(-tokens // multiple) * multiple


def scored_start(first: int, length: int) -> int:
    """Where the graph starts scoring: half of `length` when that is at or before `first`, else 0.
    Prompt positions before it skip the LM head; two choices per length keep the shapes few (each
    new shape costs a capture)."""
    half = length // 2
    return half if 0 < half <= first else 0


def keyed_trainable(lm: nn.Module, graphs, head: tuple):
    """(key, trainable slots) of a log-prob graph call whose own shapes and host integers are
    `head`, or None for the eager path (a key not to be captured, or gradients asked of a model
    with nothing trainable).  The key adds what every such call bakes in: grad mode is in `head`;
    autocast, the layers' checkpointing and sftop's checkpoint mode are added here."""
    head = (
        *head,
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        graphs.layout.checkpointing(),
        lm.__dict__.get(M.GC_MODE),
    )
    key, slots = keyed_slots(lm, graphs.layout, head, graphs.steps.would_capture)
    if slots is None:
        return None
    # a forward-only capture takes them too: the capture runs them as views of themselves
    # (cuda_graphs._aliased), which autocast never serves from its cache of casts made before it
    trainable = [slot for slot in slots if slot[2].requires_grad]
    if torch.is_grad_enabled() and not trainable:
        return None
    return key, trainable


def graph_inputs(ids: torch.Tensor, labels: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to `length` (id 0), and the labels shifted for causal LM
    (position t scores token t+1) padded with IGNORE_INDEX to the same length."""
    tokens = ids.shape[1]
    ids_p = nn.functional.pad(ids, (0, length - tokens), value=0)
    shifted = nn.functional.pad(labels[:, 1:].to(ids.device), (0, length - tokens + 1), value=IGNORE_INDEX)
    return ids_p, shifted


def all_position_logprobs(
    lm: nn.Module, ids: torch.Tensor, shifted_labels: torch.Tensor, start: int = 0, chunk_bytes: int | None = None
):
    """(log_probs, entropy, mean_logits, is_top1), each [B, T], of every position of an unpadded
    batch through the fused kernel: zeros (and no gradient) where the label is IGNORE_INDEX.
    Positions before `start` must not count: they skip the LM head and read zero.  `chunk_bytes`:
    one chunk's logits (None: the process's loss chunk)."""
    from .fused_linear_logprob import fused_linear_logprob

    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    weight = lm.get_output_embeddings().weight
    # all ones: see cuda_graphs.causal_masks_skipped
    out = lm.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    scored = fused_linear_logprob(
        hidden[:, start:].to(weight.device),
        weight,
        shifted_labels[:, start:],
        ignore_index=IGNORE_INDEX,
        softcap=getattr(config, "final_logit_softcapping", None),
        compute_dtype=lm.__dict__.get(M.LOSS_DTYPE),
        chunk_bytes=chunk_bytes,
        stats=True,
    )
    if not start:
        return scored
    return tuple(torch.cat([o.new_zeros(o.shape[0], start), o], dim=1) for o in scored)


def graphed_logprobs(lm: nn.Module, kwargs: dict, labels, shift_labels):
    """(log_probs, entropy, mean_logits, is_top1), each [B, T-1], from the graphs; or None when the
    call runs eagerly (graphs off, not training, an input the graphs don't take, left padding,
    the first sighting of a shape, a capture refused)."""
    if lm.__dict__.get(M.GRAPHS) is None:  # the cuda_graphs patch part decided graphs may not be used
        return None
    ids = kwargs.get("input_ids")
    if shift_labels is not None or not isinstance(labels, torch.Tensor) or not isinstance(ids, torch.Tensor):
        return None
    if not (_capturable(ids) and ids.dim() == 2 and ids.shape[1] >= 2 and labels.shape == ids.shape):
        return None
    if not token_ids_only(kwargs, ids, false_flags=("return_dict", "output_attentions", "output_hidden_states")):
        return None
    graphs = logprob_graphs_of(lm)
    if graphs is None:
        return None
    mask = kwargs.get("attention_mask")
    labels = labels.to(ids.device)
    scope = lm.__dict__.get(M.LABELS_FROM_ONE_BATCH)
    first = graphs.first_scored(
        ids,
        labels,
        mask.to(ids.device) if mask is not None else None,
        one_batch=scope is not None,
        known=None if scope is None else scope.known,
    )
    if first is None:
        return None
    grad = torch.is_grad_enabled()
    tokens = ids.shape[1]
    length = padded_length(tokens)
    start = scored_start(first, length)

    keyed = keyed_trainable(lm, graphs, ("logprobs", grad, ids.shape[0], length, start, ids.dtype))
    if keyed is None:
        return None
    key, trainable = keyed
    inputs = graph_inputs(ids, labels, length)

    chunk = CHUNK_BYTES

    def step(ids_, labels_):
        return all_position_logprobs(lm, ids_, labels_, start, chunk_bytes=chunk)

    out = graphs.steps.replay(key, step, inputs, trainable, backward=grad)
    if out is None:
        return None
    return tuple(o[:, : tokens - 1] for o in out)


def logprob_graphs_of(lm: nn.Module) -> LogprobGraphs | None:
    """The model's log-prob graphs for a training-mode call, made at the first one; None where the
    cuda_graphs part decided graphs may not be used, in evaluation, or under transformers' own
    (blocking) offload of the checkpoints."""
    if lm.__dict__.get(M.GRAPHS) is None or not lm.training or lm.__dict__.get(M.OFFLOADING):
        return None
    graphs = lm.__dict__.get(M.LOGPROB_GRAPHS)
    if graphs is None or graphs.owner is not lm.__dict__.get(M.GRAPHS):
        graphs = lm.__dict__[M.LOGPROB_GRAPHS] = LogprobGraphs(lm)
    return graphs


def _capturable(ids: torch.Tensor) -> bool:
    return ids.is_cuda


def graph_stats(lm: nn.Module):
    """The log-prob graphs' counters (captures, replays, eager calls, failures), or None before the
    first graphed call."""
    graphs = lm.__dict__.get(M.LOGPROB_GRAPHS)
    return None if graphs is None else graphs.steps.stats


def graphs_status(lm: nn.Module, parts: dict | None = None) -> str:
    """For the run's kernel report: whether DPO's forwards may replay from CUDA graphs, and why not."""
    if lm.__dict__.get(M.GRAPHS) is not None:
        return (
            "on: the policy forward+backward and the reference forward replay from CUDA graphs once a "
            f"batch length (padded to a multiple of {LENGTH_MULTIPLE}) repeats; left-padded or other batches "
            "run eagerly"
        )
    if not enabled_by_env():
        return f"off: turned off by {ENV_SWITCH}=0"
    part = (parts or {}).get("cuda_graphs")
    if isinstance(part, str) and part.startswith("stock"):
        return f"off: {part.removeprefix('stock: ')}"
    if not torch.cuda.is_available():
        return "off: CUDA graphs need a CUDA GPU"
    return "off: the cuda_graphs kernel part is not on for this model"
