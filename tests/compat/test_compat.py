"""Each upstream name that sftop/kernels/compat.py relies on still exists in the installed release.

A failure names the package, its installed version and the range sftop was tested with, so an
upgrade that moves a private name is caught here rather than deep inside a training step.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from sftop.kernels import compat
from sftop.kernels.patching.registry import FAMILIES


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def test_the_message_names_package_version_and_range():
    msg = compat.moved("peft", "LoraLayer.lora_A")
    assert msg.startswith(f"peft {importlib.metadata.version('peft')}: LoraLayer.lora_A is missing")
    assert f"tested with peft{compat.TESTED['peft']}" in msg


def test_the_tested_ranges_are_pyprojects_dependency_ranges():
    import tomllib

    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    ranges = {
        Requirement(r).name: Requirement(r).specifier
        for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    }
    for package, tested in compat.TESTED.items():
        assert package in ranges, f"{package} is in compat.TESTED but not a dependency in pyproject.toml"
        assert Requirement(package + tested).specifier == ranges[package], (
            f"compat.TESTED[{package!r}] = {tested!r} but pyproject.toml requires {ranges[package]}"
        )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_module_has_the_rope_function(family):
    module = FAMILIES[family].modeling_module
    modeling = importlib.import_module(module)
    assert compat.rope_function(modeling) is not None, compat.moved("transformers", f"{module}.{compat.ROPE_FUNCTION}")


def test_attn_implementation_and_checkpoint_function():
    model = _tiny_llama()
    assert compat.attn_implementation(model.config) == "sdpa", compat.moved(
        "transformers", f"PretrainedConfig.{compat.ATTN_IMPLEMENTATION}"
    )
    model.set_attn_implementation("eager")
    assert compat.attn_implementation(model.config) == "eager", compat.moved(
        "transformers", f"set_attn_implementation writing config.{compat.ATTN_IMPLEMENTATION}"
    )

    # what the vision tower does to its own sub-config: the attention reads it at call time
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording(module, *args, **kwargs):
        seen.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("sftop_compat_probe", recording)
    compat.set_config_attn_implementation(model.config, "sftop_compat_probe")
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == ["LlamaAttention"] * 2, compat.moved(
        "transformers", f"attention modules reading config.{compat.ATTN_IMPLEMENTATION} at call time"
    )
    compat.set_config_attn_implementation(model.config, "eager")

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.model.layers if compat.checkpoint_function(m, own=True) is not None]
    assert len(layers) == 2, compat.moved(
        "transformers", f"gradient_checkpointing_enable setting {compat.CHECKPOINT_FUNCTION} on each layer"
    )
    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(fn)
        return fn(*args)

    for m in layers:
        compat.set_checkpoint_function(m, spy)
    model.train()
    model(torch.randint(0, 64, (1, 5))).logits.sum().backward()
    assert len(calls) == 2, compat.moved("transformers", f"layers calling self.{compat.CHECKPOINT_FUNCTION}")


def test_peft_lora_layers_have_the_attributes_the_fast_paths_read():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    layers = [m for m in model.modules() if compat.is_peft_lora_layer(m)]
    assert len(layers) == 4, compat.moved(
        "peft", f"LoRA layer classes {compat.PEFT_LORA_CLASSES} in {compat.PEFT_LORA_MODULE}"
    )
    for m in layers:
        missing = [a for a in compat.PEFT_LORA_ATTRIBUTES if not hasattr(m, a)]
        assert not missing, compat.moved("peft", f"LoRA layer attributes {missing}")
        assert list(m.active_adapters) == ["default"]
        a, b, scale = compat.lora_weights(m, "default")
        assert (a.shape[0], b.shape[1], scale) == (4, 4, 2.0), compat.moved("peft", "lora_A/lora_B/scaling layout")
        assert isinstance(m.lora_dropout["default"], nn.Identity)
        assert isinstance(m.base_layer, nn.Linear)


def test_trainer_private_names():
    import transformers
    from trl import SFTTrainer

    assert callable(getattr(transformers.Trainer, compat.TRAINER_PREPARE_INPUTS, None)), compat.moved(
        "transformers", f"Trainer.{compat.TRAINER_PREPARE_INPUTS}"
    )
    import inspect

    # SFTTrainer keeps its logged metrics in a dict set in __init__, cleared after the memory probe
    assert f"self.{compat.TRL_METRICS} = " in inspect.getsource(SFTTrainer.__init__), compat.moved(
        "trl", f"SFTTrainer.{compat.TRL_METRICS}"
    )


def _bnb_cuda_libraries() -> list[Path]:
    spec = importlib.util.find_spec("bitsandbytes")
    assert spec is not None and spec.origin
    return sorted(Path(spec.origin).parent.glob("libbitsandbytes_cuda*"))


@pytest.mark.parametrize(
    "name",
    [compat.bnb_dequantize_symbol(d, q) for d in ("fp32", "fp16", "bf16") for q in ("nf4", "fp4")]
    + [compat.bnb_dequantize_symbol("fp32")],
)
def test_bitsandbytes_ships_the_c_functions(name):
    # the CUDA libraries cannot load without a GPU, so their exported names are looked up as bytes
    libs = _bnb_cuda_libraries()
    if not libs:
        pytest.skip("this bitsandbytes build has no CUDA library (the NF4 path falls back to its Python API)")
    missing = [p.name for p in libs if name.encode() + b"\0" not in p.read_bytes()]
    assert not missing, compat.moved("bitsandbytes", f"C function {name} in {missing}")
    assert importlib.util.find_spec(compat.BNB_CUDA_OPS) is not None, compat.moved("bitsandbytes", compat.BNB_CUDA_OPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_names_resolve_on_a_gpu():
    assert hasattr(torch._C, compat.RAW_STREAM), compat.moved("torch", f"torch._C.{compat.RAW_STREAM}")
    assert isinstance(compat.cuda_raw_stream(torch.cuda.current_device()), int)
    lib = compat.bnb_cuda_library()
    assert lib is not None, compat.moved("bitsandbytes", f"{compat.BNB_CUDA_OPS} and cextension.lib")
    for d in ("fp32", "fp16", "bf16"):
        for q in ("nf4", "fp4"):
            name = compat.bnb_dequantize_symbol(d, q)
            assert compat.bnb_c_function(lib, name) is not None, compat.moved("bitsandbytes", f"argtypes of {name}")
