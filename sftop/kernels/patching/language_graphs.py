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
The fused loss after it stays eager.

On with the tower's graphs (`SFTOP_VISION_GRAPHS=0` turns both off).  Eager for packed rows
(their fourth row of text positions marks the samples for the packed attention, which reads the
boundaries on the host), caches, sliding-window layers, reentrant checkpoints, transformers'
blocking offload of the checkpoints, and evaluation.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import markers as M
from .forwards import set_forward
from .graph_checks import call_modes, install_refusal, plain_call, uncapturable_checkpoints

FUSED = "fused"
TEXT_CLASS = "Qwen2_5_VLTextModel"
_MEMBERS = ("layers", "norm", "rotary_emb")


def find_language_models(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == TEXT_CLASS]


def patch_language_graphs(model: nn.Module) -> str:
    """Install the part on every Qwen2.5-VL text model inside `model`; "fused" or "stock: why"."""
    from ..cuda_graphs import StepGraphs, no_rng_stash

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
    return FUSED


def unpatch_language_graphs(model: nn.Module) -> None:
    from .forwards import restore_forward

    for lm in find_language_models(model):
        restore_forward(lm)


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


def _replayed(lm, graphs, hidden, cos, sin, mask):
    from ..graph_layout import keyed_slots, layout_of

    if mask is not None and not isinstance(mask, torch.Tensor):
        return None  # a mask object of another attention implementation
    layout = layout_of(graphs, lm)
    grad = torch.is_grad_enabled()
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
    )
    key, slots = keyed_slots(lm, layout, head, graphs.would_capture)
    if slots is None:
        return None
    trainable = [slot for slot in slots if slot[2].requires_grad]
    # a frozen language model still hands the embeddings' gradient on (LoRA on the tower alone)
    backward = grad and bool(trainable or hidden.requires_grad)
    inputs = (hidden, cos, sin) if mask is None else (hidden, cos, sin, mask)

    def step(hidden_, cos_, sin_, mask_=None):
        return _layers(lm, hidden_, cos_, sin_, mask_)

    grad_inputs = (0,) if backward and hidden.requires_grad else ()
    return graphs.replay(key, step, inputs, trainable if backward else [], backward=backward, grad_inputs=grad_inputs)


def graph_stats(model: nn.Module):
    """The language graphs' counters of the first text model inside `model`, or None when unpatched."""
    for lm in find_language_models(model):
        graphs = lm.__dict__.get(M.LANGUAGE_GRAPHS)
        if graphs is not None:
            return graphs.stats
    return None
