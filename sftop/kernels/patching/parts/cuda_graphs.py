"""Part cuda_graphs: the fused loss's forward replays the step's model part from CUDA graphs when a
batch shape repeats (sftop/kernels/cuda_graphs.py); it decides per call."""

from __future__ import annotations

import torch
from torch import nn

from .. import markers as M
from ..forwards import FUSED
from ..part import Part
from ..registry import FamilySpec


def apply(model: nn.Module, spec: FamilySpec) -> str:
    from ...cuda_graphs import ENV_SWITCH, StepGraphs, enabled_by_env, no_rng_stash, several_processes

    if not enabled_by_env():
        return f"stock: turned off by {ENV_SWITCH}=0"
    if not torch.cuda.is_available():
        return "stock: CUDA graphs need a CUDA GPU"
    if model.__dict__.get(M.PART) != "loss":
        return "stock: needs the fused loss part"
    if several_processes():
        return "stock: not under multi-process training"
    why = _randomness(model)
    if why:
        return f"stock: {why} (a replayed graph would reuse one random mask)"
    if M.GRAPHS not in model.__dict__:
        model.__dict__[M.GRAPHS] = StepGraphs(no_rng_stash(model))
    return FUSED


def _randomness(model: nn.Module) -> str | None:
    for k, v in model.config.to_dict().items():
        if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return f"{k}={v}"
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"dropout p={m.p} in {type(m).__name__}"
    return None


def graphed_loss(self, graphs, kwargs, shift_labels, num_items, ignore_index):
    """The loss from the captured step, or None for the eager path: not training, a batch that is
    not plain token ids (packing's position ids, embeddings, caches), padding, transformers' own
    (blocking) offload of the checkpoints."""
    from ... import cuda_graphs

    ids = kwargs.get("input_ids")
    if not (self.training and torch.is_grad_enabled()) or not torch.is_tensor(ids) or not cuda_graphs.capturable(ids):
        return None
    if self.__dict__.get(M.OFFLOADING):
        return None
    from ...cuda_graphs import token_ids_only

    if not token_ids_only(kwargs, ids):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):  # one host sync: padded batches run eagerly
        return None
    labels = shift_labels.to(ids.device)
    from ...graph_layout import keyed_slots, layout_of

    layout = layout_of(graphs, self)
    head = (
        tuple(ids.shape),
        ids.dtype,
        tuple(labels.shape),
        labels.dtype,
        ignore_index,
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        bool(
            getattr(self, "is_activation_checkpointing", None)
            if hasattr(type(self), "is_activation_checkpointing")
            else layout.checkpointing()
        ),
        self.__dict__.get(M.GC_MODE),
    )
    key, slots = keyed_slots(self, layout, head, graphs.would_capture)
    trainable = [slot for slot in slots or () if slot[2].requires_grad]
    if not trainable:
        return None
    from ...fused_linear_cross_entropy import fused_linear_cross_entropy, loss_from_sum

    backbone = getattr(self, self.base_model_prefix)
    weight = self.get_output_embeddings().weight
    softcap = getattr(self.config, "final_logit_softcapping", None)
    one = graphs.unit(ids.device)
    loss_dtype = self.__dict__.get(M.LOSS_DTYPE)

    def loss_sum(ids_, labels_):
        # all ones: see cuda_graphs.causal_masks_skipped
        out = backbone(input_ids=ids_, attention_mask=torch.ones_like(ids_), use_cache=False)
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

    total = graphs.loss_sum(key, loss_sum, (ids, labels), trainable)
    if total is None:
        return None
    return loss_from_sum(total, labels, num_items, ignore_index)


# GRAPHS sits on the model, whose forward the loss part replaced: unpatch drops it with that forward
PART = Part("cuda_graphs", apply, requires=("loss",), provides=(M.GRAPHS,))
