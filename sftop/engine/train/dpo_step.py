"""The DPO training step without a host read per micro-batch: the sigmoid (DPO) loss, with every
metric TRL logs kept on the GPU and read back once per logging step.

Why: TRL 1.16's `DPOTrainer._compute_loss` reads about fifteen metrics back to the host per
micro-batch (`.item()`, and a boolean gather for the mean logits).  Each read waits for the GPU to
finish the policy forward, so the host cannot queue the backward meanwhile: with the forwards
replayed from CUDA graphs (sftop/kernels/logprob_graphs.py) the step is short enough for that
wait to show.  Here the micro-batch's metrics go into one device vector; `DeferredMetrics.flush`
reads all of them at once when the trainer logs, and hands TRL's `log` the very numbers its own
code would have appended (the same device operations on the same tensors; the sums TRL divides on
the host are divided on the host here too).

Which steps take this path (`takes_fast_path`): training (not evaluation), one process, the one loss
`sigmoid` of DPO with the reverse-KL divergence, no length-desensitised log-probs (`ld_alpha`),
no WPO weighting, no router auxiliary loss, and the reference log-probs already in the batch (sftop's
trainer computes them first, sftop/engine/train/dpo.py).  Anything else runs TRL's own step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the order of each micro-batch's metric vector
FIELDS = (
    "entropy",
    "num_tokens",
    "chosen_logits_sum",
    "chosen_tokens",
    "rejected_logits_sum",
    "rejected_tokens",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def takes_fast_path(trainer, return_outputs: bool) -> bool:
    return (
        trainer.model.training
        and not return_outputs
        and trainer.accelerator.num_processes == 1
        and list(trainer.loss_types) == ["sigmoid"]
        and trainer.f_divergence_type == "reverse_kl"
        and trainer.ld_alpha is None
        and not trainer.use_weighting
        and not trainer.aux_loss_enabled
    )


def sigmoid_dpo_loss(trainer, model, inputs: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
    """(loss, metrics): the DPO loss of a batch [chosen rows; rejected rows] and its metric vector
    (FIELDS, float64, on the device), given the reference's summed log-probs of each side."""
    model_kwargs = {
        k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
    }
    model_kwargs["use_cache"] = False
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[..., 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    seq_len = shift_mask.size(1)
    # prompt-learning adapters prepend virtual tokens: the real tokens are the last seq_len
    logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    per_pair = -F.logsigmoid(trainer.beta * (chosen_logratios - rejected_logratios))
    loss = per_pair.mean() * trainer.loss_weights[0]
    with torch.no_grad():
        metrics = _metrics(trainer, inputs, outputs, shift_mask, seq_len, chosen_logps, rejected_logps)
        rewards_chosen = trainer.beta * chosen_logratios.detach()
        rewards_rejected = trainer.beta * rejected_logratios.detach()
        metrics += [
            rewards_chosen.mean(),
            rewards_rejected.mean(),
            (rewards_chosen > rewards_rejected).float().mean(),
            (rewards_chosen - rewards_rejected).mean(),
            chosen_logps.detach().mean(),
            rejected_logps.detach().mean(),
        ]
        vector = torch.stack([m.to(torch.float64) for m in metrics])
    return loss, vector


def _metrics(trainer, inputs, outputs, shift_mask, seq_len, chosen_logps, rejected_logps) -> list[torch.Tensor]:
    entropy = outputs.entropy[:, -seq_len:].detach()
    entropy_sum = (entropy * shift_mask).sum()
    tokens = shift_mask.sum()
    zero = torch.zeros((), dtype=entropy_sum.dtype, device=entropy_sum.device)
    mean_logits_c, mean_logits_r = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
    mask_c, mask_r = shift_mask.chunk(2, dim=0)
    top1_c, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
    tokens_c, tokens_r = mask_c.sum(), mask_r.sum()
    accuracy = (top1_c & mask_c.bool()).sum() / tokens_c
    return [
        torch.where(tokens > 0, entropy_sum / tokens, zero),
        inputs["attention_mask"].sum(),
        torch.where(mask_c.bool(), mean_logits_c, 0).sum(),
        tokens_c,
        torch.where(mask_r.bool(), mean_logits_r, 0).sum(),
        tokens_r,
        torch.where(tokens_c > 0, accuracy, torch.zeros_like(accuracy)),
    ]


class DeferredMetrics:
    """Each micro-batch's metric vector, kept on the device until the trainer logs."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []

    def add(self, vector: torch.Tensor) -> None:
        self.pending.append(vector)

    def flush(self, trainer) -> None:
        """Read every pending micro-batch at once (one host read) and append to TRL's metric lists
        what its own step would have appended, micro-batch by micro-batch."""
        if not self.pending:
            return
        rows = torch.stack(self.pending).tolist()
        self.pending = []
        metrics = trainer._metrics["train"]
        for row in rows:
            m = dict(zip(FIELDS, row))
            metrics["entropy"].append(m["entropy"])
            trainer._total_train_tokens += int(m["num_tokens"]) // trainer._tp_size
            metrics["num_tokens"] = [trainer._total_train_tokens]
            for side in ("chosen", "rejected"):
                count = int(m[f"{side}_tokens"])
                # TRL divides the two read-back sums on the host
                metrics[f"logits/{side}"].append(m[f"{side}_logits_sum"] / count if count > 0 else 0.0)
            metrics["mean_token_accuracy"].append(m["mean_token_accuracy"])
            for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
                metrics[key].append(m[key])
            metrics["logps/chosen"].append(m["logps/chosen"])
            metrics["logps/rejected"].append(m["logps/rejected"])
