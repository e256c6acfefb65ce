"""sftop/engine/train/adapter_switch.py: the reference forward's adapter switch, without PEFT's
per-call status report, gives what PEFT's own `disable_adapter` gives."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sftop.engine.train import adapter_switch


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def _lora(seed: int = 0):
    base = _llama(seed)
    return get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )


def _no_status_report(monkeypatch):
    def refuse(self):
        raise AssertionError("PEFT's model status was built")

    monkeypatch.setattr(PeftModel, "get_model_status", refuse)


def _adapter_grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}


def test_the_switch_gives_the_base_model_and_puts_the_adapters_back(monkeypatch):
    model = _lora()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        with model.disable_adapter():  # PEFT's own
            stock_off = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
    trainable = _adapter_grads(model)
    assert all(trainable.values())
    assert adapter_switch.install(model)
    _no_status_report(monkeypatch)
    with torch.no_grad():
        with model.disable_adapter():
            assert model._adapters_disabled and adapter_switch.adapters_enabled(model) is False
            assert not any(_adapter_grads(model).values())  # as PEFT: adapter weights frozen while off
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    assert torch.equal(off, stock_off) and not torch.allclose(off, adapted)
    assert torch.equal(on, adapted)
    assert _adapter_grads(model) == trainable and not model._adapters_disabled


def test_mixed_and_all_off_states_end_as_peft_ends_them(monkeypatch):
    model = _lora()
    adapter_switch.install(model)
    _no_status_report(monkeypatch)
    layers = adapter_switch._adapter_layers(model)
    assert len(layers) == 2 * 3
    layers[0].enable_adapters(False)  # one layer off: "irregular", warned, all on afterwards
    assert adapter_switch.adapters_enabled(model) == "irregular"
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert adapter_switch.adapters_enabled(model) is True
    model.base_model.disable_adapter_layers()  # all off before: stay off afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.disable_adapter():
            pass
    assert adapter_switch.adapters_enabled(model) is False


def test_prompt_learning_keeps_peft_s_own_switch():
    model = get_peft_model(_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert not adapter_switch.install(model)
    assert "disable_adapter" not in model.__dict__
    assert not adapter_switch.install(_llama())


def test_the_dpo_trainer_s_reference_forward_builds_no_status_report(home, tmp_path, monkeypatch):
    """sftop's DPO trainer installs the switch: its adapter-off reference forward (TRL's
    `use_adapter(model, None)`) runs without PEFT's report and gives the base model's log-probs."""
    from train_helpers import dpo_trainer

    from sftop.engine.presets import load_preset

    preset, _ = load_preset("demo-dpo", ['train.kernels="off"', "data.max_rows=8", 'model.adapter=""'])
    preset = preset.model_copy(update={"model": preset.model.model_copy(update={"adapter": None})})
    trainer, batch = dpo_trainer(preset, tmp_path)
    assert trainer.model.__dict__.get("disable_adapter") is not None
    torch.manual_seed(1)
    with torch.no_grad():  # a fresh adapter is the identity: make the policy differ from the base
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        adapted = (logp * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)  # adapters on: chosen, rejected
    with torch.no_grad():
        with PeftModel.disable_adapter(trainer.model):  # PEFT's own, for the expected values
            expected = trainer.compute_ref_log_probs(trainer.model, batch)
    _no_status_report(monkeypatch)
    got = trainer.compute_ref_log_probs(trainer.model, batch)
    for g, e, a in zip(got, expected, adapted):
        assert torch.equal(g, e) and not torch.allclose(g, a)
    assert all(_adapter_grads(trainer.model).values())  # the adapters train again afterwards
