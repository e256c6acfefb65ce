"""The planner's predicted peak for a vision-language step against the measured one.

A Qwen2.5-VL-3B-shaped model (its published config, random weights: no download), LoRA on the
family's default parts, micro-batches of ROWS rows of TOKENS tokens each holding one IMAGE x IMAGE
picture, trained for a few steps through sftop's own trainer (TRL's SFTTrainer with sftop's
additions) with hand-built batches of the sizes the processor would make. Prints one JSON object:
the plan's predicted allocated peak, `torch.cuda.max_memory_allocated` over the steps, their ratio,
and the planner's breakdown.

  python benchmarks/vlm_planner_peak.py --rows 4 --tokens 1024 --image 448 --r 16 --checkpointing on
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def qwen25_vl_3b_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            hidden_act="silu",
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            in_chans=3,
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def make_batch(config, rows: int, tokens: int, image: int, seed: int = 0) -> dict:
    """One micro-batch as Qwen's processor builds it for one image x image picture per row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    grid = image // vision.patch_size
    patches = grid * grid
    image_tokens = patches // vision.spatial_merge_size**2
    ids = torch.randint(1000, 150000, (rows, tokens), generator=g)
    prompt = 1 + image_tokens + 1 + 32
    ids[:, 0] = config.vision_start_token_id
    ids[:, 1 : 1 + image_tokens] = config.image_token_id
    ids[:, 1 + image_tokens] = config.vision_end_token_id
    labels = ids.clone()
    labels[:, :prompt] = -100
    per_patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(rows * patches, per_patch, generator=g),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * rows),
    }


def measure(
    rows: int = 4, tokens: int = 1024, image: int = 448, r: int = 16, checkpointing: str = "on", steps: int = 3
) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sftop.engine.models.demo_vlm import demo_family
    from sftop.engine.models.vision.lora_parts import target_module_names
    from sftop.engine.models.vision.registry import family_for_config
    from sftop.engine.planner import plan_run
    from sftop.engine.presets.schema import Preset
    from sftop.engine.train.config import build_sft_config
    from sftop.engine.train.trainer import SftopTrainer, UpdateGuard

    config = qwen25_vl_3b_config()
    family = family_for_config(config) or demo_family()  # the Qwen-VL families share their LoRA targets
    preset = Preset.model_validate(
        {
            "name": "vlm-peak",
            "model": {"name": "qwen2.5-vl-3b-shape", "dtype": "bf16"},
            "lora": {"r": r, "alpha": r},
            "data": {"max_length": tokens, "packing": False},
            "train": {"kernels": "off", "max_steps": steps, "effective_batch": rows, "save_steps": 10_000},
            "plan": {"micro_batch": rows, "grad_accum": 1, "gradient_checkpointing": checkpointing},
        }
    )
    total_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    image_tokens = (image // 14) ** 2 // 4 + 2
    plan = plan_run(preset, config, gpu_memory_gib=total_gib, image_tokens_per_row=[image_tokens] * rows)

    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=target_module_names(base, family, None)))
    batch = make_batch(config, rows, tokens, image)
    with tempfile.TemporaryDirectory() as out:
        args = build_sft_config(
            preset, plan, output_dir=Path(out), dtype="bf16", packing=False, has_eval=False, on_cuda=True, vision=True
        )
        guard = UpdateGuard(5)
        trainer = SftopTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"row": list(range(rows * steps))}),
            processing_class=demo_family().offline_processor(),
            data_collator=lambda items: dict(batch),
            callbacks=[guard],
            guard=guard,
            save_total_limit=1,
        )
        torch.cuda.synchronize()
        start = time.time()
        trainer.train()
        torch.cuda.synchronize()
        seconds = time.time() - start
    measured = torch.cuda.max_memory_allocated() / GIB
    predicted = plan.predicted_allocated_gib
    return {
        "device": torch.cuda.get_device_name(),
        "rows": rows,
        "tokens": tokens,
        "image": image,
        "lora_r": r,
        "checkpointing": plan.gradient_checkpointing,
        "predicted_allocated_gib": round(predicted, 3),
        "measured_max_allocated_gib": round(measured, 3),
        "ratio": round(predicted / measured, 4),
        "breakdown_gib": plan.breakdown,
        "notes": plan.notes,
        "steps": steps,
        "train_s": round(seconds, 1),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--image", type=int, default=448)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--checkpointing", default="on", choices=["off", "on"])
    args = parser.parse_args()
    print(json.dumps(measure(args.rows, args.tokens, args.image, args.r, args.checkpointing), indent=2))


if __name__ == "__main__":
    main()
