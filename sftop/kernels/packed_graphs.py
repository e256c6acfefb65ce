"""CUDA graphs for packed (padding-free) micro-batches, one captured step per token-length bucket.

Why: the fixed-shape graphs (cuda_graphs.py) only replay a batch whose shape repeats, and a packed
micro-batch of mixed-length rows has a new length almost every step, so packed runs trained
eagerly and host-bound.  The trainer pads each packed row up to one of a few lengths
(sftop/engine/train/buckets.py); here each bucket length is captured once and replayed.  Lengths
fitted to the run's data recur by construction, so each is captured at its first sighting
(`expect_length_buckets`); other lengths wait for a second, as every shape does in cuda_graphs.py.

What a captured packed step takes as inputs (copied into static buffers each replay): the token
ids, the shifted labels, the position ids, and the rows' boundaries `cu_seq_lens`, padded to a
fixed count by repeating the last boundary (empty rows, which flash attention skips), so that
batches with a different number of rows replay the same graph.  The longest row is given to
flash attention as the bucket's length (an upper bound: it only sizes the launch grid).  The
padding document has labels -100, so it adds nothing to the loss sum or its gradients.

Rules beyond cuda_graphs.py's: the model must run sftop's packed attention (varlen_attention.py:
its row boundaries come as a tensor, so nothing is read back to the host inside the capture), and
the cuda_graphs patch part must be on (no dropout, the fused loss).  At most `MAX_BUCKET_GRAPHS`
buckets are captured per model; their steps share one set of gradient buffers (cuda_graphs.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import compat, cuda_graphs
from .cuda_graphs import CAPTURE_PHASES, StepGraphs, no_rng_stash
from .patching import markers as M
from .graph_layout import keyed_slots, layout_of
from .varlen_attention import NAME as VARLEN
from .varlen_attention import rows_given

from .constants import MAX_BUCKET_GRAPHS

CU_MULTIPLE = 8  # row-boundary tensors are padded to a multiple of this many entries
_PACKED_GRAPHS = "_sftop_packed_graphs"
_FITTED_BUCKETS = "_sftop_fitted_buckets"  # expect_length_buckets


def causal_lm(model: nn.Module) -> nn.Module:
    """The *ForCausalLM module under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def padded_boundaries(cu: torch.Tensor, multiple: int = CU_MULTIPLE) -> torch.Tensor:
    """`cu_seq_lens` grown to a multiple of `multiple` entries by repeating its last value (empty rows)."""
    n = cu.numel()
    size = -(-n // multiple) * multiple
    if size == n:
        return cu
    return torch.cat([cu, cu[-1:].expand(size - n)])


def _eligible(lm: nn.Module, inputs: dict) -> bool:
    ids = inputs.get("input_ids")
    if not (
        lm.training
        and torch.is_grad_enabled()
        and isinstance(ids, torch.Tensor)
        and cuda_graphs.capturable(ids)
        and ids.shape[0] == 1
    ):
        return False
    if lm.__dict__.get(M.GRAPHS) is None or lm.__dict__.get(M.OFFLOADING):
        return False
    if compat.attn_implementation(lm.config) != VARLEN:
        return False
    allowed = {
        "input_ids",
        "labels",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
        "use_cache",
    }
    if any(k not in allowed and v is not None for k, v in inputs.items()):
        return False
    return all(torch.is_tensor(inputs.get(k)) for k in ("labels", "position_ids", "cu_seq_lens_q"))


def expect_length_buckets(model: nn.Module, sizes: tuple[int, ...]) -> None:
    """The run's packed micro-batches come padded to these lengths, fitted to its data so that each
    recurs (engine/train/buckets.py): a bucket's graph is then captured at its first sighting.
    The eager first sighting that other shapes get would cost a whole host-bound step per bucket
    (0.1-0.5 s each on Llama-3.2-1B, docs/benchmarks.md), where the capture's warm-up does the
    same work anyway."""
    causal_lm(model).__dict__[_FITTED_BUCKETS] = frozenset(int(size) for size in sizes)


def _is_fitted_bucket(lm: nn.Module, key: tuple) -> bool:
    # key[1]: the micro-batch's padded length (the head packed_graphed_loss builds)
    return key[1] in lm.__dict__.get(_FITTED_BUCKETS, ())


def packed_graphed_loss(model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor | None:
    """The mean token loss of a packed micro-batch from its bucket's captured step, or None when it
    must run eagerly (first sighting of a bucket, not eligible, capture refused)."""
    lm = causal_lm(model)
    if not _eligible(lm, inputs):
        return None
    graphs = lm.__dict__.get(_PACKED_GRAPHS)
    if graphs is None:
        graphs = lm.__dict__[_PACKED_GRAPHS] = StepGraphs(
            no_rng_stash(lm), max_keys=MAX_BUCKET_GRAPHS, recurring=functools.partial(_is_fitted_bucket, lm)
        )
    ignore_index = -100
    ids = inputs["input_ids"]
    tokens = ids.shape[1]
    labels = nn.functional.pad(inputs["labels"], (0, 1), value=ignore_index)[..., 1:].to(ids.device)
    positions = inputs["position_ids"].to(ids.device)
    cu = padded_boundaries(inputs["cu_seq_lens_q"].to(device=ids.device, dtype=torch.int32))
    layout = layout_of(graphs, lm)
    head = (
        "packed",
        tokens,
        cu.numel(),
        ids.dtype,
        positions.dtype,
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        layout.checkpointing(),
        lm.__dict__.get(M.GC_MODE),
    )
    key, slots = keyed_slots(lm, layout, head, graphs.would_capture)
    trainable = [slot for slot in slots or () if slot[2].requires_grad]
    if not trainable:
        return None
    from .fused_linear_cross_entropy import fused_linear_cross_entropy, loss_from_sum

    backbone = getattr(lm, lm.base_model_prefix)
    weight = lm.get_output_embeddings().weight
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    one = graphs.unit(ids.device)
    loss_dtype = lm.__dict__.get(M.LOSS_DTYPE)

    def loss_sum(ids_, labels_, positions_, cu_):
        # the bucket's length bounds every row: flash attention only sizes its grid with it
        out = backbone(
            input_ids=ids_,
            position_ids=positions_,
            cu_seq_lens_q=cu_,
            cu_seq_lens_k=cu_,
            max_length_q=tokens,
            max_length_k=tokens,
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels_,
            num_items_in_batch=one,
            ignore_index=ignore_index,
            softcap=softcap,
            compute_dtype=loss_dtype,
            select_rows=False,
        )

    total = graphs.loss_sum(key, loss_sum, (ids, labels, positions, cu), trainable)
    if total is None:
        return None
    return loss_from_sum(total, labels, num_items_in_batch, ignore_index)


def mark_rows_given(model: nn.Module, inputs: dict) -> None:
    """Before an eager forward of a packed micro-batch: where the model runs sftop's packed
    attention, its row boundaries come as `cu_seq_lens`, and transformers is told not to search the
    position ids for them (a host read per forward; varlen_attention.rows_given)."""
    positions, ids = inputs.get("position_ids"), inputs.get("input_ids")
    if not (isinstance(positions, torch.Tensor) and isinstance(ids, torch.Tensor)):
        return
    if ids.dim() != 2 or ids.shape[0] != 1:
        return
    if torch.is_tensor(inputs.get("cu_seq_lens_q")) and compat.attn_implementation(causal_lm(model).config) == VARLEN:
        rows_given(positions)


def step_graphs_of(model: nn.Module) -> list[StepGraphs]:
    """Every `StepGraphs` sftop's patches hung on `model`: fixed-shape, packed, DPO's log-prob steps,
    a vision-language model's tower blocks and language layers."""
    lm = causal_lm(model)
    found = [g for name in (M.GRAPHS, _PACKED_GRAPHS) if isinstance(g := lm.__dict__.get(name), StepGraphs)]
    logprob = lm.__dict__.get(M.LOGPROB_GRAPHS)
    if logprob is not None and isinstance(getattr(logprob, "steps", None), StepGraphs):
        found.append(logprob.steps)
    for module in lm.modules():  # a vision-language model's tower and language layers (patching/*_graphs.py)
        found += [
            g for name in (M.TOWER_GRAPHS, M.LANGUAGE_GRAPHS) if isinstance(g := module.__dict__.get(name), StepGraphs)
        ]
    return list({id(g): g for g in found}.values())


def release_graphs(model: nn.Module) -> None:
    """Drop every CUDA graph captured for `model` with the memory pools they keep: after an
    out-of-memory error the run goes on with a smaller plan, which needs that memory and captures
    its own shapes again where there is room."""
    for graphs in step_graphs_of(model):
        graphs.release()
    # DPO's (logprob_graphs.LogprobGraphs): its steps and the last batch check go; the next graphed
    # call starts a fresh one
    causal_lm(model).__dict__.pop(M.LOGPROB_GRAPHS, None)


def graphs_summary(model: nn.Module) -> dict | None:
    """What `model`'s CUDA graphs did over a run, summed over all of them, or None where nothing
    used them: shapes captured, replays, calls run eagerly, failures, and the host seconds the
    captures took by phase (cuda_graphs.CAPTURE_PHASES)."""
    all_stats = [g.stats for g in step_graphs_of(model)]
    if not any(s.captures or s.replays or s.eager_calls or s.failures for s in all_stats):
        return None
    seconds = {phase: round(sum(s.capture_seconds[phase] for s in all_stats), 3) for phase in CAPTURE_PHASES}
    return {
        "captures": sum(s.captures for s in all_stats),
        "replays": sum(s.replays for s in all_stats),
        "eager_calls": sum(s.eager_calls for s in all_stats),
        "failures": [why for s in all_stats for why in s.failures],
        "capture_s": round(sum(seconds.values()), 3),
        "capture_s_by_phase": seconds,
    }


def packed_graph_stats(model: nn.Module):
    """The packed graphs' counters (captures, replays, eager calls), or None before the first packed step."""
    graphs = causal_lm(model).__dict__.get(_PACKED_GRAPHS)
    return None if graphs is None else graphs.stats
