"""Preference tuning's LM head: per-token log-probabilities through the fused linear log-prob kernel.

TRL 1.16's DPOTrainer asks the model for `model(..., labels=labels, fused_lm_head=True)` and reads
`log_probs`, `entropy`, `mean_logits` and `is_top1` from the output (TRL's `add_fused_lm_head`
answers that call with its own chunked head, installed on the model when the trainer is built).
`install_logprob_head` puts sftop's answer on top: the backbone runs through the model's (patched)
layers, then `fused_linear_logprob` scores only the positions whose label counts, in token chunks,
with the unit input-gradient ready at the end of forward.  Any other call (generation, a plain
loss) goes to the forward underneath, unchanged.  Once a batch shape repeats, a training call
replays the backbone and the kernel (over every position, labels -100 scoring zero) from CUDA graphs
instead (sftop/kernels/logprob_graphs.py); anything the graphs do not take runs as described here.  The policy forward and the reference forward
(the same model with its adapter disabled) both take this path.
"""

from __future__ import annotations

import types

from torch import nn

from . import markers as M

_MARK = M.LOGPROB_HEAD


def _refusal(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"stock: lm_head is {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "stock: lm_head has a bias"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"stock: the model scales its logits ({key})"
    if getattr(config, "output_router_logits", False):
        return "stock: mixture-of-experts router losses"
    if not isinstance(getattr(model, "base_model", None), nn.Module):
        return "stock: no backbone"
    return None


def install_logprob_head(model: nn.Module) -> str:
    """Answer `fused_lm_head=True` calls on `model` (the HF causal LM, not a PeftModel) with the kernel.

    Call it after TRL has added its own fused head.  Returns "fused", or "stock: why".
    """
    why = _refusal(model)
    if why:
        return why
    if model.__dict__.get(_MARK):
        return "fused"
    below = model.forward
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            # keys left out when None, as the forward underneath may not take them all
            return below(*args, **_with(kwargs, labels, shift_labels, num_items_in_batch))
        from trl.trainer.utils import FusedCausalLMOutput

        from ..logprob_graphs import graphed_logprobs
        from ..shared_prompt import layout_for_call, shared_prompt_logprobs

        kwargs["use_cache"] = False
        shared = None if args else layout_for_call(self, kwargs, shift_labels)
        graphed = None if args or shared is not None else graphed_logprobs(self, kwargs, labels, shift_labels)
        if shared is not None:  # each pair's prompt once (sftop/kernels/shared_prompt.py)
            log_probs, entropy, mean_logits, is_top1, mask = shared_prompt_logprobs(self, shared, labels, softcap)
        elif graphed is not None:  # replayed from a CUDA graph (sftop/kernels/logprob_graphs.py)
            log_probs, entropy, mean_logits, is_top1 = graphed
            mask = labels[:, 1:].to(log_probs.device) != -100
        else:
            log_probs, entropy, mean_logits, is_top1, mask = _eager_logprobs(
                self, args, kwargs, labels, shift_labels, softcap
            )
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denom,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=None,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
            aux_loss=None,
        )

    model.forward = types.MethodType(forward, model)
    model.__dict__[_MARK] = True
    return "fused"


def _eager_logprobs(self, args, kwargs, labels, shift_labels, softcap):
    """The backbone, then the kernel over the positions whose label counts (a boolean gather: one host
    sync), scattered back to [B, T-1] with zeros elsewhere."""
    from ..fused_linear_logprob import fused_linear_logprob

    out = self.base_model(*args, **kwargs)
    hidden = out.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = self.get_output_embeddings()
    labels = labels.to(head.weight.device)
    mask = labels != -100
    logp, ent, mean, top1 = fused_linear_logprob(
        hidden.to(head.weight.device)[mask],
        head.weight,
        labels[mask],
        softcap=softcap,
        compute_dtype=self.__dict__.get(M.LOSS_DTYPE),
        stats=True,
    )
    return padded_rows((logp, ent, mean, top1), mask)


def padded_rows(scored, mask):
    """(log_probs, entropy, mean_logits, is_top1, mask): each value of `scored` ([M] per scored
    position, in `mask`'s row-major order) put back at its [B, T-1] place, zeros elsewhere."""
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero, not an error)
    return (*(v.new_zeros(mask.shape).masked_scatter(mask, v) for v in scored), mask)


def _with(kwargs: dict, labels, shift_labels, num_items_in_batch) -> dict:
    for key, value in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
        if value is not None:
            kwargs[key] = value
    return kwargs
