"""`dpo.reference = PATH`: the reference log-probabilities come from that model or adapter, not from
the policy with its adapter switched off."""

import pytest
import torch

from sftop.engine.presets import load_preset
from sftop.engine.rundir import new_run_dir
from sftop.engine.train.runner import run_training
from train_helpers import dpo_trainer, events_of, in_home, of_type, reference_logps_in_loss

DPO = [
    'train.kernels="off"',
    "train.max_steps=2",
    "train.effective_batch=4",
    "plan.micro_batch=4",
    "plan.grad_accum=1",
    "train.warmup_ratio=0.0",
    "data.max_rows=8",
    'model.adapter=""',
]


def _preset(reference: str):
    preset, _ = load_preset("demo-dpo", DPO + [f'dpo.reference="{reference}"'])
    return preset.model_copy(update={"model": preset.model.model_copy(update={"adapter": None})})


@pytest.fixture(scope="module")
def references(sftop_home, tmp_path_factory):
    """A whole model (the demo's architecture, other weights) and an adapter trained-looking on the demo model."""
    from peft import LoraConfig, get_peft_model

    from sftop.engine.models.demo import build_model, ensure_demo_model
    from transformers import AutoTokenizer

    mp = in_home(sftop_home)
    try:
        demo = ensure_demo_model()
    finally:
        mp.undo()
    folder = tmp_path_factory.mktemp("references")
    tokenizer = AutoTokenizer.from_pretrained(demo)
    other = build_model(tokenizer, seed=1)
    other.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo)
    torch.manual_seed(3)
    adapted = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapted.save_pretrained(folder / "adapter")
    return folder


def _logps(model, batch):
    """Sequence log-probabilities of the answers, from plain logits in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def _adapter_off(trainer, batch):
    with trainer.model.disable_adapter():
        return _logps(trainer.model, batch)


def _means(logps):
    """Mean over the chosen half and the rejected half of the batch, as TRL logs them."""
    chosen, rejected = logps.chunk(2)
    return torch.tensor([chosen.mean(), rejected.mean()], dtype=torch.float64)


def test_reference_model_directory(home, references, tmp_path):
    from sftop.engine.train.dpo import load_reference_model, reference_adapter

    preset = _preset(str(references / "model"))
    assert reference_adapter(preset.dpo.reference) is None  # a model, not an adapter
    reference = load_reference_model(preset)
    assert not any(p.requires_grad for p in reference.parameters())
    trainer, batch = dpo_trainer(preset, tmp_path, ref_model=reference)
    assert trainer.sftop_reference == "separate model"
    got = torch.tensor(reference_logps_in_loss(trainer, batch), dtype=torch.float64)
    assert torch.allclose(got, _means(_logps(reference, batch)), atol=1e-3)
    assert (got - _means(_adapter_off(trainer, batch))).abs().min() > 0.1  # not the policy's base model


def test_reference_adapter_directory(home, references, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftop.engine.models.demo import ensure_demo_model
    from sftop.engine.train.dpo import reference_adapter

    preset = _preset(str(references / "adapter"))
    path = reference_adapter(preset.dpo.reference)
    assert path == (references / "adapter").resolve()
    trainer, batch = dpo_trainer(preset, tmp_path, reference_adapter=path)
    assert trainer.sftop_reference == f"adapter {path}"
    assert trainer.sftop_save_kwargs == {"selected_adapters": ["default"]}  # the reference is not saved
    got = torch.tensor(reference_logps_in_loss(trainer, batch), dtype=torch.float64)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ensure_demo_model()), path).eval()
    assert torch.allclose(got, _means(_logps(expected, batch)), atol=1e-3)
    assert (got - _means(_adapter_off(trainer, batch))).abs().max() > 1e-2
    # the reference adapter is frozen; the policy's own adapter trains
    trainable = {
        n.split(".lora_")[1].split(".")[1]
        for n, p in trainer.model.named_parameters()
        if p.requires_grad and ".lora_" in n
    }
    assert trainable == {"default"}


def test_run_with_a_reference_model_starts_with_a_margin(home, references):
    """Against the adapter-off reference the first step's margin is exactly 0; against another model
    it is not, and the run says which reference it used."""
    preset = _preset(str(references / "model"))
    run_dir = new_run_dir("demo-dpo")
    assert run_training(preset, run_dir) == 0
    records = events_of(run_dir.path)
    assert of_type(records, "run_started")[0]["kernels"]["reference"] == "separate model"
    first = of_type(records, "step")[0]
    assert abs(first["reward_margin"]) > 1e-3 and abs(first["loss"] - 0.6931) > 1e-4
    assert records[-1]["type"] == "run_finished"


def test_a_reference_adapter_of_another_model_is_refused(home, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftop.engine.errors import ModelError

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide")
    preset = _preset(str(tmp_path / "wide"))
    from sftop.engine.train.dpo import reference_adapter

    with pytest.raises(ModelError) as exc:
        dpo_trainer(preset, tmp_path / "out", reference_adapter=reference_adapter(preset.dpo.reference))
    assert exc.value.where == "dpo.reference" and "does not fit this model" in str(exc.value)
