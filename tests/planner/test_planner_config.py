from __future__ import annotations

import pytest
from _shapes import llama_1b, preset

from sftop.engine.errors import ModelError
from sftop.engine.planner import load_model_config
from sftop.engine.planner.estimate import ModelShape


def test_demo_config_without_building_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path))
    config = load_model_config(preset("builtin:demo-tiny"))
    shape = ModelShape.from_config(config)
    from sftop.engine.models.demo import MODEL_SIZE

    assert (shape.hidden, shape.layers) == (MODEL_SIZE["hidden_size"], MODEL_SIZE["num_hidden_layers"])
    assert shape.total_params < 50_000_000  # small enough for the CPU plan
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing was built or downloaded


def test_unknown_builtin():
    with pytest.raises(ModelError, match="Unknown built-in model"):
        load_model_config(preset("builtin:nope"))


def test_local_directory(tmp_path):
    llama_1b().save_pretrained(tmp_path)
    config = load_model_config(preset(str(tmp_path)))
    assert ModelShape.from_config(config) == ModelShape.from_config(llama_1b())


def test_hub_id_offline_and_not_cached_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        load_model_config(preset("sftop-test-org/not-a-real-model"))
    assert "offline" in str(err.value) and "model.name" in str(err.value)


def test_known_hub_model_offline_uses_the_published_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    config = load_model_config(preset("meta-llama/Llama-3.2-1B-Instruct"))
    assert ModelShape.from_config(config) == ModelShape.from_config(llama_1b())
    qwen = ModelShape.from_config(load_model_config(preset("Qwen/Qwen2.5-1.5B-Instruct")))
    assert (qwen.hidden, qwen.layers, qwen.kv_heads, qwen.vocab, qwen.attn_bias) == (1536, 28, 2, 151936, True)


def test_every_builtin_preset_plans_offline(tmp_path, monkeypatch):
    from sftop.engine.planner import plan_run
    from sftop.engine.presets.loader import list_presets, load_preset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path))
    for info in list_presets():
        if info.origin != "built-in":
            continue
        p, _ = load_preset(info.name, [])
        plan = plan_run(p, load_model_config(p), gpu_memory_gib=24)
        assert plan.micro_batch * plan.grad_accum == p.train.effective_batch, info.name
        assert plan.predicted_peak_gib <= plan.budget_gib, info.name
