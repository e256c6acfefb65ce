"""sftop's DPO step keeps TRL's metrics on the device (sftop/engine/train/dpo_step.py): the loss and
LoRA gradients are TRL's, the logged rewards, margins and accuracies are exactly the numbers TRL's
own step logs, and nothing is read back to the host until the trainer logs (once)."""

import sys
from pathlib import Path

import pytest
import torch

import sftop.kernels as K
from sftop.engine.train import dpo_step

from _kernel_testutil import DEVICE, rel_err
from _tiny_models import tiny_model
from test_dpo_logprob_head import LOGIT_METRICS, REWARD_METRICS, _trainer

EXACT = REWARD_METRICS
CLOSE = LOGIT_METRICS + ("num_tokens",)


def _logged(trainer, batches, monkeypatch, fast: bool):
    """The loss, LoRA gradients and logged metrics of micro-batches through compute_loss, then log."""
    monkeypatch.setattr(dpo_step, "takes_fast_path", lambda *a: fast)
    import sftop.engine.train.dpo as dpo

    monkeypatch.setattr(dpo, "takes_fast_path", lambda *a: fast)
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._total_train_tokens = 0
    losses = []
    for batch in batches:
        loss = trainer.compute_loss(
            trainer.model, {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
        )
        loss.backward()
        losses.append(loss.detach())
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
    logs: dict = {}
    trainer.log(logs)  # TRL's log adds the averaged metrics to this very dict
    monkeypatch.undo()
    return losses, grads, logs


def test_deferred_metrics_are_trls_and_read_once_per_log(tmp_path, monkeypatch):
    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.update_guard import UpdateGuard

    model = tiny_model("llama", init_lora_weights=False)  # B != 0: policy != reference
    K.patch_model(model)
    trainer = _trainer(SftopDPOTrainer, model, tmp_path, "sigmoid", guard=UpdateGuard(5), save_total_limit=1)
    assert dpo_step.takes_fast_path(trainer, False)
    rows = [trainer.train_dataset[i] for i in range(8)]
    batches = [trainer.data_collator(rows[:4]), trainer.data_collator(rows[4:])]
    stock_losses, stock_grads, stock = _logged(trainer, batches, monkeypatch, fast=False)

    trl_file = str(Path(sys.modules[type(trainer).__mro__[1].__module__].__file__))
    ours_files = {str(Path(dpo_step.__file__)), str(Path(sys.modules[SftopDPOTrainer.__module__].__file__))}
    reads: list[tuple[str, str]] = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def read(t, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller == trl_file or caller in ours_files:
                reads.append((Path(caller).name, _name))
            return _original(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    ours_losses, ours_grads, ours = _logged(trainer, batches, monkeypatch, fast=True)
    # two micro-batches, one read: the pending metric vectors, when the trainer logged
    assert reads == [("dpo_step.py", "tolist")]
    for a, b in zip(stock_losses, ours_losses):
        assert torch.equal(a, b)
    for a, b in zip(stock_grads, ours_grads):
        assert rel_err(b, a) < 1e-6
    assert abs(stock["rewards/margins"]) > 1e-3 and 0.0 < stock["rewards/accuracies"] <= 1.0
    assert list(ours) == list(stock)  # the same keys, in TRL's order
    for key in EXACT:
        assert ours[key] == stock[key], key  # the same device operations on the same values
    for key in CLOSE:
        assert ours[key] == pytest.approx(stock[key], rel=1e-6), key
    assert ours["num_tokens"] == trainer._total_train_tokens == sum(int(b["attention_mask"].sum()) for b in batches)


def test_other_losses_and_evaluation_take_trls_step(tmp_path):
    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.update_guard import UpdateGuard

    model = tiny_model("llama")
    trainer = _trainer(SftopDPOTrainer, model, tmp_path, "ipo", guard=UpdateGuard(5), save_total_limit=1)
    trainer.model.train()
    assert not dpo_step.takes_fast_path(trainer, False)  # ipo: TRL's own step, its metrics as always
    trainer.loss_types = ["sigmoid"]
    assert dpo_step.takes_fast_path(trainer, False)
    assert not dpo_step.takes_fast_path(trainer, True)  # outputs asked for
    trainer.model.eval()
    assert not dpo_step.takes_fast_path(trainer, False)  # evaluation logs TRL's eval metrics
    trainer.model.train()
    trainer.ld_alpha = 0.5
    assert not dpo_step.takes_fast_path(trainer, False)
