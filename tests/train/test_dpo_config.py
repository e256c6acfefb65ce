"""DPO preset keys: validation, and how they reach TRL's DPOConfig (the rest is the SFT run's settings)."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from sftop.engine.presets.schema import Preset
from sftop.engine.train.config import build_sft_config
from sftop.engine.train.dpo import build_dpo_config


def test_dpo_keys_and_their_checks():
    p = Preset()
    assert p.train.task == "sft" and p.dpo.beta == 0.1 and p.dpo.loss_type == "sigmoid"
    assert p.dpo.reference == "adapter-off" and p.model.adapter is None
    with pytest.raises(ValidationError, match="exo_pair needs label_smoothing"):
        Preset(dpo={"loss_type": "exo_pair"})
    with pytest.raises(ValidationError):
        Preset(dpo={"loss_type": "kto"})  # not one of DPOTrainer's losses
    with pytest.raises(ValidationError):
        Preset(train={"task": "ppo"})
    with pytest.raises(ValidationError, match='set train.task = "dpo"'):
        Preset(data={"format": "preference"})
    assert Preset(data={"format": "ultrafeedback"}, train={"task": "dpo"}).data.format == "ultrafeedback"


def test_dpo_config_carries_the_keys_and_the_sft_settings(tmp_path):
    preset = Preset(
        train={"task": "dpo", "learning_rate": 5e-4, "max_steps": 7, "optimizer": "adamw"},
        dpo={"beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.1},
    )
    plan = SimpleNamespace(micro_batch=2, grad_accum=4, gradient_checkpointing="on")
    args = build_dpo_config(preset, plan, output_dir=tmp_path, dtype="fp32", has_eval=False, on_cuda=False)
    sft = build_sft_config(
        preset, plan, output_dir=tmp_path, dtype="fp32", packing=False, has_eval=False, on_cuda=False
    )
    assert (args.beta, args.loss_type, args.label_smoothing) == (0.3, ["ipo"], 0.1)
    assert args.max_length is None and not args.padding_free and not args.precompute_ref_log_probs
    for key in (
        "learning_rate",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "optim",
        "lr_scheduler_type",
        "save_steps",
        "seed",
        "max_grad_norm",
    ):
        assert getattr(args, key) == getattr(sft, key), key
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
