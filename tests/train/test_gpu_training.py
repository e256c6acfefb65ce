"""Training on a real CUDA GPU: bf16, fused kernels, probe, QLoRA. Skipped without a GPU.

Run on a GPU machine:  pytest -m gpu tests/train/test_gpu_training.py -q
"""

import pytest
import torch

from sftop.engine.export import export_run
from sftop.engine.presets import load_preset
from sftop.engine.train.runner import run_training
from train_helpers import events_of, of_type

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _finished(run_dir):
    records = events_of(run_dir)
    assert records[-1]["type"] == "run_finished", records[-3:]
    return records


def test_demo_on_gpu_bf16_kernels_probe(home, tmp_path):
    preset, _ = load_preset("demo", ["train.max_steps=40"])
    assert run_training(preset, tmp_path / "run") == 0
    records = _finished(tmp_path / "run")
    started = of_type(records, "run_started")[0]
    env = started["environment"]
    assert env["device"].startswith("cuda") and env["dtype"] in ("bf16", "fp16")
    assert started["plan"]["device"].startswith("cuda")
    assert started["plan"]["probe"]["ok"] is True, started["plan"]["probe"]
    parts = dict(started["kernels"].get("parts", {}))
    # kept q/k/v applies to wide layers only: the demo's are too narrow to hide its copies
    assert parts.pop("kept_projections", "").startswith("stock: layers too narrow"), started["kernels"]
    assert parts and all(v == "fused" for v in parts.values()), started["kernels"]
    steps = of_type(records, "step")
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert all(s["gpu_mem_allocated_gib"] > 0 and s["gpu_mem_reserved_gib"] > 0 for s in steps)
    assert not of_type(records, "bad_step")


def test_kernels_match_stock_on_gpu(home, tmp_path):
    losses = {}
    for mode in ("off", "on"):
        preset, _ = load_preset("demo", ["train.max_steps=5", f'train.kernels="{mode}"', "train.save_steps=100"])
        assert run_training(preset, tmp_path / mode) == 0
        losses[mode] = [s["loss"] for s in of_type(_finished(tmp_path / mode), "step")]
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)  # bf16


def test_qlora_demo_trains_and_exports_merged(home, tmp_path):
    pytest.importorskip("bitsandbytes")
    preset, _ = load_preset("demo", ["model.load_in_4bit=true", "train.max_steps=20", "train.save_steps=10"])
    assert run_training(preset, tmp_path / "run") == 0
    records = _finished(tmp_path / "run")
    started = of_type(records, "run_started")[0]
    assert started["environment"]["model"]["load_in_4bit"] is True
    steps = of_type(records, "step")
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    out = export_run(tmp_path / "run", merged=True, out=tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not getattr(merged, "is_loaded_in_4bit", False)


def test_optimizer_8bit_on_gpu(home, tmp_path):
    pytest.importorskip("bitsandbytes")
    preset, _ = load_preset("demo", ['train.optimizer="adamw_8bit"', "train.max_steps=10", "train.save_steps=5"])
    assert run_training(preset, tmp_path / "run") == 0
    steps = of_type(_finished(tmp_path / "run"), "step")
    assert steps[-1]["loss"] < steps[0]["loss"]
