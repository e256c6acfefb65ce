"""A truncated or overwritten weights file is a one-paragraph error, not a traceback."""

import os
import shutil

import pytest

from sftop.engine.errors import ModelError
from sftop.engine.models import demo
from sftop.engine.models.loading import load_base_model
from sftop.engine.presets.schema import ModelSection


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTOP_HOME", str(home))
        path = demo.ensure_demo_model()
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_base_weights_say_what_where_and_what_next(demo_copy, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "model"
    shutil.copytree(demo_copy, model_dir)
    weights = model_dir / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        weights.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError) as info:
        load_base_model(ModelSection(name=str(model_dir), dtype="fp32"))
    text = str(info.value)
    assert f"weights in {model_dir} cannot be read" in text and "truncated or damaged" in text
    assert "again" in text
