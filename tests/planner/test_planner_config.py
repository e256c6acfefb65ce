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
