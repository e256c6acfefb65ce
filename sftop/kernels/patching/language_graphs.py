"""Part language_graphs: a Qwen2.5-VL model's language layers replayed from CUDA graphs once a
batch's shape repeats, their gradient handed back to the image embeddings in their input.

Why: a text model's training step replays from the cuda_graphs part, but a vision-language batch
is not plain token ids: the language model takes embeddings the vision tower wrote into
(`inputs_embeds`) and 3-D rotary positions, and the cuda_graphs part leaves every such step
eager.  On Qwen2.5-VL-3B the language model alone took 0.36 s of a 0.69 s step whose GPU was busy
for 39 % of it (docs/benchmarks.md, 2026-12-06): its 36 layers' small Functions, launched by the
host.

How: the text model's forward becomes sftop's own, step for step transformers' (the causal mask
and the multimodal rotary cos/sin computed eagerly, with whatever host reads they take), except
that the decoder layers and the final norm run through a `StepGraphs` of the text model
(cuda_graphs.py), keyed by the embeddings' shape and dtype and whether they need a gradient, the
cos/sin and mask shapes, grad mode, autocast, the layers' checkpointing and its function, and every
parameter's address, `requires_grad` and adapter state (graph_layout.py).  The captured backward
hands the embeddings' gradient on (`grad_inputs`), so the vision tower's adapters keep learning.

The loss goes into the same graphs: the loss part asks for it (`loss_inside`) with the shifted
labels and the output head, and the captured step ends with sftop's fused linear cross-entropy
(its token losses summed; the loss part divides outside the graph, so the count may change every
step).  Eager beside the graphs, the loss's logits chunk and gradient buffers sat in the ordinary
cache on top of the graphs' pool at the step's peak (Qwen2.5-VL-3B: 169 MiB of a step's
allocations live at its peak, 64 MiB of them the logits chunk, docs/benchmarks.md); inside, they
take blocks of the pool the layers' forward has freed by then.  The text model then returns no
hidden states (`last_hidden_state` None): only the loss part, which asked, reads the output.

The tower's graphs and these share one memory pool for their first captured step (the tower's
replays wrap these: nested_graphs.py), which holds the larger of the two steps' transients where
a pool each held both.

On with the tower's graphs (`SFTOP_VISION_GRAPHS=0` turns both off).  Eager for packed rows
(their fourth row of text positions marks the samples for the packed attention, which reads the
boundaries on the host), caches, sliding-window layers, reentrant checkpoints, transformers'
blocking offload of the checkpoints, and evaluation.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from . import markers as M
from .forwards import set_forward
from .graph_checks import call_modes, install_refusal, plain_call, uncapturable_checkpoints

FUSED = "fused"
TEXT_CLASS = "Qwen2_5_VLTextModel"
_MEMBERS = ("layers", "norm", "rotary_emb")


@dataclass
class LossInside:
    """The loss part's request: the graphs end with the loss of these shifted labels through this
    output head, and leave its token-loss sum in `total` (None: the call ran eagerly, the loss is
    the caller's to compute from the hidden states)."""

    labels: torch.Tensor
    weight: torch.Tensor
    ignore_index: int
    softcap: float | None
    compute_dtype: torch.dtype | None
    total: torch.Tensor | None = None


@contextlib.contextmanager
def loss_inside(model: nn.Module, labels, weight, ignore_index: int, softcap, compute_dtype):
    """While `model`'s backbone runs: its graphed language layers compute the loss too.  Yields the
    request (read its `total` afterwards), or None where they cannot: no graphed text model, or an
    output head that trains (its gradient is not among the layers' captured ones)."""
    found = model.__dict__.get(M.LANGUAGE_GRAPHED_MODELS)
    if found is None:  # looked up once per model: a walk over every module costs host time a step
        found = model.__dict__[M.LANGUAGE_GRAPHED_MODELS] = find_language_models(model)
    found = [lm for lm in found if M.LANGUAGE_GRAPHS in lm.__dict__]  # the part may be off since
    if len(found) != 1 or weight.requires_grad or labels.ndim != 2:
        yield None
        return
    lm = found[0]
    request = LossInside(labels, weight, ignore_index, softcap, compute_dtype)
    lm.__dict__[M.LANGUAGE_LOSS] = request
    try:
        yield request
    finally:
        lm.__dict__.pop(M.LANGUAGE_LOSS, None)


def find_language_models(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == TEXT_CLASS]


def patch_language_graphs(model: nn.Module) -> str:
    """Install the part on every Qwen2.5-VL text model inside `model`; "fused" or "stock: why"."""
    from ..cuda_graphs import StepGraphs, no_rng_stash
    from ..nested_graphs import nest

    found = find_language_models(model)
    if not found:
        return f"stock: only {TEXT_CLASS}'s layers are graphed"
    for lm in found:
        why = install_refusal(lm)
        if why:
            return why
        missing = [name for name in _MEMBERS if not hasattr(lm, name)]
        if missing:
            return f"stock: the language model has no {', '.join(missing)}"
        if getattr(lm, "has_sliding_layers", False):
            return "stock: sliding-window layers (their mask is built per layer type)"
        if not callable(getattr(sys.modules.get(type(lm).__module__), "create_causal_mask", None)):
            return "stock: the modeling module has no create_causal_mask"
    for lm in found:
        if M.LANGUAGE_GRAPHS not in lm.__dict__:
            lm.__dict__[M.LANGUAGE_GRAPHS] = StepGraphs(no_rng_stash(lm))
        set_forward(lm, _forward, "language_graphs")
    towers = [m.__dict__[M.TOWER_GRAPHS] for m in model.modules() if M.TOWER_GRAPHS in m.__dict__]
    if len(found) == 1 and len(towers) == 1:
        # the tower's replays wrap the language layers' (its forward before, its backward after):
        # one memory pool for both (nested_graphs.py)
        nest(leader=towers[0], follower=found[0].__dict__[M.LANGUAGE_GRAPHS])
    return FUSED


def unpatch_language_graphs(model: nn.Module) -> None:
    from .forwards import restore_forward

    for lm in find_language_models(model):
        restore_forward(lm)
    for module in model.modules():
        module.__dict__.pop(M.LANGUAGE_GRAPHED_MODELS, None)


def _forward(
    self,
    base,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    use_cache=None,
    **kwargs,
):
    from ..cuda_graphs import capturable

    graphs = self.__dict__.get(M.LANGUAGE_GRAPHS)
    eager = (
        graphs is None
        or not self.training
        or input_ids is not None
        or inputs_embeds is None
        or past_key_values is not None
        or use_cache
        or not plain_call(kwargs, self.config)
        or not isinstance(position_ids, torch.Tensor)
        or position_ids.ndim != 3
        or position_ids.shape[0] != 3  # four rows: packed samples (see the module docstring)
        or not capturable(inputs_embeds)
        or len(self.layers) == 0
        or uncapturable_checkpoints(self.layers[0])
    )
    if eager:
        return base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
    return language_forward(self, graphs, inputs_embeds, attention_mask, position_ids)


def language_forward(lm: nn.Module, graphs, inputs_embeds, attention_mask, position_ids):
    """transformers' Qwen2.5-VL text model forward for an uncached, unpacked training call, its
    layers and final norm run by `run_layers`."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    create_causal_mask = sys.modules[type(lm).__module__].create_causal_mask
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=None,
    )
    cos, sin = lm.rotary_emb(inputs_embeds, position_ids)
    request = lm.__dict__.get(M.LANGUAGE_LOSS)
    if (
        request is not None
        and torch.is_grad_enabled()
        and tuple(request.labels.shape) == tuple(inputs_embeds.shape[:2])
    ):
        total = _replayed(lm, graphs, inputs_embeds, cos, sin, mask, request)
        if total is not None:
            request.total = total
            return BaseModelOutputWithPast(last_hidden_state=None, past_key_values=None)
        # a first sighting, or a capture refused: eagerly, the loss left to the loss part (a
        # second try without the loss would count, and capture, a key of its own)
        hidden = _layers(lm, inputs_embeds, cos, sin, mask)
    else:
        hidden = run_layers(lm, graphs, inputs_embeds, cos, sin, mask)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=None)


def _layers(lm: nn.Module, hidden, cos, sin, mask):
    for layer in lm.layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=None,
            past_key_values=None,
            use_cache=False,
        )
    return lm.norm(hidden)


def run_layers(lm: nn.Module, graphs, hidden, cos, sin, mask):
    """The layers' and norm's output, replayed from the text model's graphs where the call allows,
    else eagerly."""
    out = _replayed(lm, graphs, hidden, cos, sin, mask)
    if out is None:
        return _layers(lm, hidden, cos, sin, mask)
    return out


def _replayed(lm, graphs, hidden, cos, sin, mask, loss: LossInside | None = None):
    """The layers' output (or, with `loss`, the loss's token sum) from the graphs, or None: run
    eagerly."""
    from ..graph_layout import keyed_slots, layout_of

    if mask is not None and not isinstance(mask, torch.Tensor):
        return None  # a mask object of another attention implementation
    grad = torch.is_grad_enabled()
    layout = layout_of(graphs, lm)
    head = (
        "language_layers",
        grad,
        hidden.requires_grad,
        tuple(hidden.shape),
        hidden.dtype,
        tuple(cos.shape),
        cos.dtype,
        None if mask is None else (tuple(mask.shape), mask.dtype),
        *call_modes(layout, lm.layers[0]),
        None if loss is None else _loss_key(loss),
    )
    key, slots = keyed_slots(lm, layout, head, graphs.would_capture)
    if slots is None:
        return None
    trainable = [slot for slot in slots if slot[2].requires_grad]
    # a frozen language model still hands the embeddings' gradient on (LoRA on the tower alone)
    backward = grad and bool(trainable or hidden.requires_grad)
    if loss is not None and not backward:
        return None
    n_masks = 0 if mask is None else 1
    inputs = (hidden, cos, sin) + ((mask,) if mask is not None else ())
    if loss is not None:
        inputs += (loss.labels.to(hidden.device),)
        one = graphs.unit(hidden.device)

    def step(hidden_, cos_, sin_, *rest):
        out = _layers(lm, hidden_, cos_, sin_, rest[0] if n_masks else None)
        if loss is None:
            return out
        from ..fused_linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            out,
            loss.weight,
            rest[n_masks],
            num_items_in_batch=one,
            ignore_index=loss.ignore_index,
            softcap=loss.softcap,
            compute_dtype=loss.compute_dtype,
            select_rows=False,  # dropping rows that do not count reads a count on the host
        )

    grad_inputs = (0,) if backward and hidden.requires_grad else ()
    return graphs.replay(key, step, inputs, trainable if backward else [], backward=backward, grad_inputs=grad_inputs)


def _loss_key(loss: LossInside) -> tuple:
    """What of the loss shapes its captured work: the labels' shape and dtype, the head's tensor
    (its address: a replaced head is captured afresh), the ignored label, softcap, matmul dtype."""
    w = loss.weight
    return (
        "loss",
        tuple(loss.labels.shape),
        loss.labels.dtype,
        w.data_ptr(),
        tuple(w.shape),
        w.dtype,
        loss.ignore_index,
        loss.softcap,
        loss.compute_dtype,
    )


def graph_stats(model: nn.Module):
    """The language graphs' counters of the first text model inside `model`, or None when unpatched."""
    for lm in find_language_models(model):
        graphs = lm.__dict__.get(M.LANGUAGE_GRAPHS)
        if graphs is not None:
            return graphs.stats
    return None
