"""Part loss: the CausalLM's forward computes the loss with the fused linear cross-entropy
(sftop/kernels/fused_linear_cross_entropy.py) and returns logits=None."""

from __future__ import annotations

from torch import nn

from ...env import env_flag
from .. import markers as M
from ..forwards import FUSED, quantised_compute_dtype, set_forward
from ..part import Part
from ..registry import FamilySpec

# set to get the logits back from a training forward (the fused loss returns logits=None)
RETURN_LOGITS_ENV = "SFTOP_RETURN_LOGITS"


def _forward(self, orig, *args, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ...fused_linear_cross_entropy import fused_linear_cross_entropy, loss_from_sum
    from ..language_graphs import loss_inside

    labels = kwargs.get("labels")
    shift_labels = kwargs.get("shift_labels")
    # Paths that need the stock forward: no labels (generation, metrics), TRL's own fused LM head
    # (it wants per-token log-probs, not a loss), positional calls we can't map safely, and an
    # explicit request for logits.
    if (
        (labels is None and shift_labels is None)
        or kwargs.get("fused_lm_head")
        or len(args) > 1
        or env_flag(RETURN_LOGITS_ENV, default=False)
    ):
        return orig(*args, **kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    kwargs.pop("labels", None)
    kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    ignore_index = kwargs.pop("ignore_index", -100)

    if shift_labels is None:
        # as HF: token t predicts label t+1; the last position predicts nothing
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    graphs = self.__dict__.get(M.GRAPHS)  # part cuda_graphs
    if graphs is not None:
        from .cuda_graphs import graphed_loss

        loss = graphed_loss(self, graphs, kwargs, shift_labels, num_items, ignore_index)
        if loss is not None:
            result = CausalLMOutputWithPast(loss=loss, logits=None)
            return result.to_tuple() if return_dict is False else result
    backbone = getattr(self, self.base_model_prefix)
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    compute_dtype = self.__dict__.get(M.LOSS_DTYPE)
    # a vision-language model's graphed language layers take the loss into their graphs
    with loss_inside(self, shift_labels, head.weight, ignore_index, softcap, compute_dtype) as graphed:
        out = backbone(**kwargs)
    if graphed is not None and graphed.total is not None:
        loss = loss_from_sum(graphed.total, graphed.labels, num_items, ignore_index)
        result = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None))
        return result.to_tuple() if return_dict is False else result
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    loss = fused_linear_cross_entropy(
        hidden,
        head.weight,
        shift_labels.to(hidden.device),
        num_items_in_batch=num_items,
        ignore_index=ignore_index,
        softcap=softcap,
        compute_dtype=compute_dtype,
    )
    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
    return result.to_tuple() if return_dict is False else result


def apply(model: nn.Module, spec: FamilySpec) -> str:
    if type(model).__name__ != spec.causal_lm_class:
        return f"stock: {type(model).__name__} is not {spec.causal_lm_class}"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        # PEFT-wrapped or quantised heads have no plain weight to multiply by
        return f"stock: lm_head is {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "stock: lm_head has a bias"
    if not isinstance(getattr(model, model.base_model_prefix, None), nn.Module):
        return f"stock: no backbone at .{model.base_model_prefix}"
    model.__dict__[M.LOSS_DTYPE] = quantised_compute_dtype(model)
    set_forward(model, _forward, "loss")
    return FUSED


PART = Part("loss", apply, provides=(M.PART, M.LOSS_DTYPE))
