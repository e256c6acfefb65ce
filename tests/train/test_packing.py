"""Padding-free packing must keep documents apart: packed loss == sum of per-document losses."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftop.engine.models.demo import demo_dir
from sftop.engine.train.packing import packing_isolated


def _summed_nll(model, batch):
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(), int(mask.sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_sum_of_row_losses(home, attn):
    model = AutoModelForCausalLM.from_pretrained(demo_dir(), attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (9, 14, 5):
        ids = torch.randint(3, 500, (n,), generator=gen).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]  # prompt masked, answer trained
        rows.append({"input_ids": ids, "labels": labels})
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed = collate(rows)
    assert packed["input_ids"].shape == (1, 28) and "attention_mask" not in packed
    packed_loss, packed_tokens = _summed_nll(model, dict(packed))
    row_losses = [
        _summed_nll(model, {"input_ids": torch.tensor([r["input_ids"]]), "labels": torch.tensor([r["labels"]])})
        for r in rows
    ]
    assert packed_tokens == sum(n for _, n in row_losses)
    assert packed_loss.item() == pytest.approx(sum(l.item() for l, _ in row_losses), rel=1e-5)


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention code knows nothing of packing (like some trust_remote_code models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids=input_ids, use_cache=False)


def test_isolation_probe(home):
    model = AutoModelForCausalLM.from_pretrained(demo_dir()).train()
    ok, detail = packing_isolated(model, 512, 0)
    assert ok, detail
    assert model.training  # the probe restores the mode it found
    leaky_ok, leaky_detail = packing_isolated(_IgnoresPositions(model), 512, 0)
    assert not leaky_ok, leaky_detail


def test_padding_free_training_equals_padded_training(home, tmp_path):
    """Same rows, same steps: packing must change the speed, never the numbers."""
    from sftop.engine.train.runner import run_training
    from train_helpers import events_of, fast_preset, of_type

    runs = {}
    for packing in ("true", "false"):
        run_dir = tmp_path / packing
        # split_by rows: the Trainer's own row order for both (token-balanced steps take sftop's order;
        # tests/train/test_token_batches.py checks those against one packed micro-batch)
        assert (
            run_training(
                fast_preset(
                    "train.max_steps=3", "train.save_steps=100", f"data.packing={packing}", 'plan.split_by="rows"'
                ),
                run_dir,
            )
            == 0
        )
        records = events_of(run_dir)
        assert of_type(records, "run_started")[0]["environment"]["packing"] is (packing == "true")
        runs[packing] = of_type(records, "step")
    padded, packed = runs["false"], runs["true"]
    assert [s["tokens_seen"] for s in packed] == [s["tokens_seen"] for s in padded]  # padding not counted
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
