"""A DPO run keeps its plan's checkpointing for every step.

TRL's DPOTrainer switches checkpointing off around each reference forward and back on with the
TrainingArguments' whole `gradient_checkpointing_kwargs`, where the plan's `offload` and
`every_n_layers` sit (Trainer itself pops them before it calls the model).  Passed on as they are,
they reached torch's checkpoint as layer arguments and were ignored: from the second step on, an
"offload" plan kept its layer inputs on the GPU and a spaced plan checkpointed every layer."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from train_helpers import dpo_trainer
from trl.models.utils import disable_gradient_checkpointing

from sftop.engine.train.checkpointing_api import enable_checkpointing
from sftop.kernels.patching import checkpointing
from sftop.kernels.patching import markers as M

PLAN_KWARGS = {"use_reentrant": False, "offload": True, "every_n_layers": 2}


def _llama(layers=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _state(model):
    """(transformers' offload on, which layers are checkpointed)."""
    layers = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return model.__dict__.get(M.OFFLOADING), layers


def _as_trainer_enables(model, kwargs):
    """What Trainer does with TrainingArguments' dict: the two keys popped and passed on their own."""
    kwargs = dict(kwargs)
    every = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    enable_checkpointing(model, kwargs or None, every_n_layers=every, offload=offload)


def test_switching_checkpointing_back_on_with_the_whole_dict_keeps_offload_and_spacing():
    model = _llama()
    checkpointing.install(model)
    _as_trainer_enables(model, PLAN_KWARGS)
    first = _state(model)
    # this CPU has no overlapped offload: transformers' own offload carries the plan's choice
    assert first == (True, [True, False, True, False])
    with disable_gradient_checkpointing(model, PLAN_KWARGS):
        assert not any(_state(model)[1])
    assert _state(model) == first
    # a dict without them keeps the arguments given, as before
    model.gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    assert _state(model) == (False, [True, False, True, False])


def test_the_dpo_trainer_reference_forward_keeps_the_plans_checkpointing(home, tmp_path):
    from sftop.engine.presets import load_preset

    preset, _ = load_preset("demo-dpo", ['train.kernels="off"', "data.max_rows=8", 'model.adapter=""'])
    preset = preset.model_copy(update={"model": preset.model.model_copy(update={"adapter": None})})
    kwargs = {"use_reentrant": False, "every_n_layers": 2}
    trainer, batch = dpo_trainer(
        preset, tmp_path, config=dict(gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    )
    base = trainer.model.get_base_model()
    _as_trainer_enables(trainer.model, kwargs)
    first = _state(base)
    assert first[1][:2] == [True, False] and len(first[1]) >= 2
    trainer.compute_ref_log_probs(trainer.model, batch)  # TRL switches checkpointing off and on here
    assert _state(base) == first


def _embedding_hooks(model) -> int:
    return len(model.get_input_embeddings()._forward_hooks)


def test_trl_s_switch_around_the_reference_forward_is_a_pause(monkeypatch):
    """TRL switches checkpointing off and back on with the same arguments around every reference
    forward: sftop's wrapper turns the layers' flags off and on again, without transformers' full
    enable (a walk over every module and fresh checkpoint functions), and the layers keep the very
    functions they had; arguments that differ take the full path."""
    from peft import LoraConfig, get_peft_model

    from sftop.engine.train.checkpointing_api import enable_checkpointing

    base = _llama()
    checkpointing.install(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    _as_trainer_enables(model, PLAN_KWARGS)
    first = _state(base)
    functions = [m._gradient_checkpointing_func for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    full = []  # transformers' enable and disable both set every module through this walk
    real = type(base)._set_gradient_checkpointing
    monkeypatch.setattr(
        type(base), "_set_gradient_checkpointing", lambda self, *a, **k: (full.append(1), real(self, *a, **k))[1]
    )
    for _ in range(3):
        with disable_gradient_checkpointing(model, PLAN_KWARGS):
            assert not any(_state(base)[1]) and not base.is_gradient_checkpointing
        assert _state(base) == first
    assert full == []
    after = [m._gradient_checkpointing_func for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert all(a is b for a, b in zip(after, functions))
    # paused, then other arguments: the full enable runs and builds what they ask
    model.gradient_checkpointing_disable()
    enable_checkpointing(model, {"use_reentrant": False}, every_n_layers=1, offload=False)
    assert full == [1] and _state(base) == (False, [True, True, True, True])


def test_the_input_gradient_hooks_do_not_pile_up(monkeypatch):
    """Every full enable registers the input embeddings' gradient hook, and transformers' disable
    leaves a PeftModel base's in place: one more hook a reference forward, each run by every later
    forward.  With sftop's wrapper there is one however often checkpointing is switched."""
    from peft import LoraConfig, get_peft_model

    base = _llama()
    checkpointing.install(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    for every in (1, 2, 1, 2):  # different arguments each time: the full path
        with disable_gradient_checkpointing(model, {"use_reentrant": False, "every_n_layers": every}):
            pass
        model.gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
    assert _embedding_hooks(base) == 1
    ids = torch.randint(0, 64, (1, 5))
    out = model.get_input_embeddings()(ids)
    assert out.requires_grad  # the one hook still marks the embeddings
