"""Loading a vision-language model: recognised from its config, LoRA by part, 16-bit vision under
QLoRA, gradient checkpointing through the vision tower, kernels on the language layers only."""

import pytest
import torch
from pydantic import ValidationError

from sftop.engine.errors import PresetError
from sftop.engine.models.demo_vlm import DEMO_VLM_NAME, demo_family, demo_vlm_config
from sftop.engine.models.vision.lora_parts import target_module_names, target_regex
from sftop.engine.presets.schema import Preset


@pytest.fixture
def vlm_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "vlm-home"
    monkeypatch.setenv("SFTOP_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _preset(**lora):
    return Preset.model_validate(
        {"model": {"name": DEMO_VLM_NAME}, "lora": {"r": 4, **lora}, "train": {"kernels": "off"}}
    )


@pytest.fixture
def tiny_vlm():
    torch.manual_seed(0)
    return demo_family().model_class().from_config(demo_vlm_config())


def test_builtin_vlm_loads_with_family_class_and_default_parts(vlm_home):
    from transformers import Qwen2VLForConditionalGeneration

    from sftop.engine.models.loading import load_model

    model, processor, info = load_model(_preset())
    assert isinstance(model.get_base_model(), Qwen2VLForConditionalGeneration)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.tokenizer.pad_token is not None
    assert info.vision_family == "qwen2_vl" and info.to_dict()["vision_family"] == "qwen2_vl"
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert len(adapted) == 21 and all(".language_model.layers." in n for n in adapted)
    assert info.params_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_local_directory_is_recognised_from_its_config(vlm_home, tiny_vlm, tmp_path):
    processor = demo_family().offline_processor()
    tiny_vlm.save_pretrained(tmp_path / "vlm")
    processor.tokenizer.save_pretrained(tmp_path / "vlm")
    preset = Preset.model_validate({"model": {"name": str(tmp_path / "vlm")}, "train": {"kernels": "off"}})
    from sftop.engine.models.vision.loading import vision_family

    assert vision_family(preset.model).name == "qwen2_vl"
    from sftop.engine.models.vision.detect import family_on_disk

    assert family_on_disk(str(tmp_path / "vlm")).display_name == "Qwen2-VL"
    assert family_on_disk("builtin:demo-tiny") is None


@pytest.mark.parametrize(
    "parts, expected",
    [
        (None, {"language": 21}),
        (["language", "attention"], {"language": 12}),
        (["language", "mlp"], {"language": 9}),
        (["vision"], {"vision": 8}),  # 2 blocks x (qkv, proj, fc1, fc2)
        (["vision", "attention"], {"vision": 4}),
        (["projector"], {"projector": 2}),  # the merger's two linears (its norm is not a linear)
        (["language", "vision", "projector", "attention", "mlp"], {"language": 21, "vision": 8, "projector": 2}),
    ],
)
def test_lora_parts_pick_linears_by_part(tiny_vlm, parts, expected):
    family = demo_family()
    names = target_module_names(tiny_vlm, family, parts)
    got = {
        "language": sum(".language_model." in n for n in names),
        "vision": sum(".visual.blocks." in n for n in names),
        "projector": sum(".visual.merger." in n for n in names),
    }
    assert {k: v for k, v in got.items() if v} == expected
    assert all(isinstance(tiny_vlm.get_submodule(n), torch.nn.Linear) for n in names)


def test_lora_parts_errors_name_the_key():
    family = demo_family()
    with pytest.raises(PresetError, match="Unknown LoRA part") as exc:
        target_regex(family, ["vision", "heads"])
    assert exc.value.where == "lora.parts"
    with pytest.raises(PresetError, match="names no part"):
        target_regex(family, ["attention"])
    with pytest.raises(ValidationError):
        Preset.model_validate({"lora": {"parts": ["eyes"]}})


def test_qlora_keeps_vision_tower_and_projector_16_bit():
    from sftop.engine.models.vision.loading import quantization_skip_modules

    assert quantization_skip_modules(demo_family(), demo_vlm_config()) == ["model.visual", "lm_head"]


def test_gradient_checkpointing_covers_the_vision_tower(tiny_vlm):
    from peft import LoraConfig, get_peft_model

    from sftop.engine.models.vision.loading import vision_checkpointed, vision_supports_checkpointing

    family = demo_family()
    names = target_module_names(tiny_vlm, family, ["language", "vision", "attention", "mlp"])
    model = get_peft_model(tiny_vlm, LoraConfig(r=4, target_modules=names))
    assert vision_supports_checkpointing(model, family)
    assert not vision_checkpointed(model, family)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert vision_checkpointed(model, family)
    # and the vision blocks really run through the checkpoint function in a training step
    calls = []
    blocks = model.get_base_model().model.visual.blocks
    for i, block in enumerate(blocks):
        inner = block._gradient_checkpointing_func

        def counting(*args, _inner=inner, _i=i, **kwargs):
            calls.append(_i)
            return _inner(*args, **kwargs)

        block._gradient_checkpointing_func = counting
    model.train()
    processor = family.offline_processor()
    from PIL import Image

    text = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        tokenize=False,
    )
    batch = processor(text=[text], images=[Image.new("RGB", (56, 56), (200, 0, 0))], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert calls == list(range(len(blocks)))
    vision_lora = [p for n, p in model.named_parameters() if ".visual.blocks." in n and "lora_B" in n]
    assert vision_lora and all(p.grad is not None for p in vision_lora)


def test_kernels_report_for_vlms(tiny_vlm, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from sftop.engine.models.vision import loading

    family = demo_family()
    model = get_peft_model(tiny_vlm, LoraConfig(r=4, target_modules=target_module_names(tiny_vlm, family, None)))
    assert loading.apply_vision_kernels(model, family, "off") == {"enabled": False, "reason": "train.kernels = off"}
    monkeypatch.setattr("sftop.engine.models.loading.cuda_available", lambda: False)
    auto = loading.apply_vision_kernels(model, family, "auto")
    assert auto["enabled"] is False and auto["language_model_type"] == "qwen2" and "no CUDA" in auto["reason"]
    stock = type("StockFamily", (type(family),), {"language_model_type": None})()
    report = loading.apply_vision_kernels(model, stock, "auto")
    assert report["enabled"] is False and "not ones sftop's kernels cover" in report["reason"]
    with pytest.raises(Exception, match="train.kernels = on"):
        loading.apply_vision_kernels(model, stock, "on")


def test_patch_model_finds_a_vlms_language_layers(tiny_vlm):
    """The patcher, told the text family, patches the language layers it knows by class and leaves
    the parts that assume a causal LM stock, with the reason."""
    from peft import LoraConfig, get_peft_model

    from sftop.engine.models.vision.loading import VLM_KERNEL_PARTS
    from sftop.kernels import patch_model

    family = demo_family()
    model = get_peft_model(tiny_vlm, LoraConfig(r=4, target_modules=target_module_names(tiny_vlm, family, None)))
    report = patch_model(model, model_type="qwen2", only=VLM_KERNEL_PARTS)
    assert report.family == "qwen2"
    if all(v.startswith("stock: ") and "triton" in v.lower() for v in report.parts.values()):
        pytest.skip(f"kernels unavailable here: {report.parts}")
    assert report.parts["mlp"] == "fused"  # Qwen2-VL's text MLP is Qwen2MLP
    assert report.parts["loss"].startswith("stock: not applied")
    assert report.parts["cuda_graphs"].startswith("stock: not applied")
    # the overlapped offload is a VLM part (the tower's blocks and the language layers), on a GPU
    assert report.parts["checkpoint_offload"] == (
        "fused" if torch.cuda.is_available() else "stock: offloading to host memory needs a CUDA GPU"
    )
    patch_model(model, enable=False)


def test_presets_show_and_plan_speak_of_the_vlm(vlm_home, capsys):
    from sftop.cli import main

    assert main(["presets", "show", "demo-vision"]) == 0
    shown = capsys.readouterr().out
    assert 'parts = [\n    "language",\n    "vision",\n    "projector",' in shown
    assert (
        "# Qwen2-VL vision-language model: lora.parts = language, vision, projector, attention, mlp; "
        "family default ['language', 'attention', 'mlp']" in shown
    )
    assert (
        main(["plan", "demo-vision", "--set", "data.max_rows=24", "--set", "plan.micro_batch=4", "--gpu-memory", "24"])
        == 0
    )
    plan = capsys.readouterr().out
    assert "images: pixel tensors" in plan and "images: vision tower activations" in plan
    assert "image tokens per micro-batch of 4: p95" in plan and "no data check yet" not in plan


def test_data_check_counts_image_tokens_with_the_family(vlm_home, capsys):
    from sftop.cli import main

    main(["data", "check", "demo-vision", "--set", "data.max_rows=24"])
    out = capsys.readouterr().out
    assert "of all tokens are image tokens" in out and "needs a vision model to count" not in out
