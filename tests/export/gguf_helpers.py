"""Runs to export without training: a saved tiny base model, a real PEFT adapter with non-zero
weights (so the merge changes the outputs), and the run's preset pointing at that base."""

from __future__ import annotations

from pathlib import Path

import torch

from sftop.engine.presets import load_preset
from sftop.engine.presets.loader import save_preset

SAMPLE = "What is 12 + 30?\nThe quick brown fox: 42 letters, (maybe) 7!"


def make_run(run_dir: Path, base_dir: Path, model, tokenizer, seed: int = 0, targets=None) -> Path:
    """A finished-looking run of `model` at `base_dir`, with an adapter whose B is not zero."""
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    run_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    preset, _ = load_preset("demo", [f'model.name="{base_dir}"', 'model.dtype="fp32"'])
    save_preset(preset, run_dir / "preset.toml")
    return run_dir
