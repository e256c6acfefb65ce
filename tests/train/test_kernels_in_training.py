"""With train.kernels = "on", training runs sftop's fused kernels, the loss kernel included, and
matches the stock path. On CPU the Triton kernels run in the interpreter (tests/conftest.py)."""

import os

import pytest

import sftop.kernels.fused_linear_cross_entropy as flce
from sftop.engine.train.runner import run_training
from train_helpers import FAST, events_of, of_type

STEPS = ["train.max_steps=2", "train.save_steps=100"]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not __import__("torch").cuda.is_available(),
    reason="needs a GPU or the Triton interpreter",
)
def test_fused_kernels_train_like_the_stock_layers(home, tmp_path, monkeypatch):
    from sftop.engine.presets import load_preset

    calls = []
    real = flce.fused_linear_cross_entropy
    monkeypatch.setattr(flce, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    losses = {}
    for mode in ("off", "on"):
        overrides = [o for o in FAST if not o.startswith("train.kernels")] + [f'train.kernels="{mode}"'] + STEPS
        preset, _ = load_preset("demo", overrides)
        assert run_training(preset, tmp_path / mode) == 0
        records = events_of(tmp_path / mode)
        losses[mode] = [s["loss"] for s in of_type(records, "step")]
        kernels = of_type(records, "run_started")[0]["kernels"]
    assert kernels["enabled"] and kernels["parts"]["loss"] == "fused", kernels
    assert len(calls) == 2  # one fused loss per training step, none on the stock run
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)
