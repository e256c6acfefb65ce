"""`builtin:demo-vlm-tiny`: a tiny random-init Qwen2-VL with its processor, built locally and cached.

Like `builtin:demo-tiny` it is saved in Hugging Face format (weights, config, processor) so that
it goes through exactly the loader a hub VLM goes through. Qwen2-VL is the family used because
its vision tower is the cheapest on a CPU: small images become few patches (28-pixel blocks), and
the language layers are plain Qwen2 ones. Building is deterministic and takes a few seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sftop.engine.paths import cache_dir

DEMO_VLM_NAME = "builtin:demo-vlm-tiny"
DEMO_VLM_FAMILY = "qwen2_vl"
# Bump when the recipe changes so old caches are rebuilt instead of silently reused.
DEMO_VLM_VERSION = "1"

# Wider than the family's test config so LoRA can learn colours, counts and positions in minutes.
# (head_dim stays the family config's 16, which its M-RoPE sections are sized for)
TEXT_SIZE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4
)
VISION_SIZE = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2)
# As in the text demo: a random LM head at the usual 0.02 scale caps the logits near +-5, so LoRA
# alone could never make a confident answer; a wider head lets the adapter learn sharp answers.
LM_HEAD_STD = 0.1


def demo_vlm_dir() -> Path:
    return cache_dir() / "models" / "demo-vlm-tiny"


def demo_family():
    from sftop.engine.models.vision.registry import all_families

    return all_families()[DEMO_VLM_FAMILY]


def demo_vlm_config():
    """The demo's config (no weights): the family's tiny config at the demo's sizes."""
    config = demo_family().tiny_config()
    data = config.to_dict()
    text = {k: v for k, v in data["text_config"].items() if k != "layer_types"}  # rebuilt for the new depth
    data["text_config"] = {**text, **TEXT_SIZE}
    # the vision tower's output width is the language model's
    data["vision_config"] = {**data["vision_config"], **VISION_SIZE, "hidden_size": TEXT_SIZE["hidden_size"]}
    return type(config)(**data)


def build_model(seed: int = 0):
    import torch
    from transformers import GenerationConfig

    config = demo_vlm_config()
    family = demo_family()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.model_class().from_config(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0.0, LM_HEAD_STD)
    text = config.text_config
    model.generation_config = GenerationConfig(
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, do_sample=False
    )
    return model


def ensure_demo_vlm() -> Path:
    """The cached demo VLM directory, built first if needed (atomically: temp dir, then rename)."""
    target = demo_vlm_dir()
    marker = target / "sftop-demo-version"
    if marker.is_file() and marker.read_text().strip() == DEMO_VLM_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-vlm-tiny-build-", dir=target.parent))
    try:
        build_model().save_pretrained(tmp)
        demo_family().offline_processor().save_pretrained(tmp)
        (tmp / "sftop-demo-version").write_text(DEMO_VLM_VERSION + "\n")
        if target.exists():
            old = target.with_name(f".demo-vlm-tiny-old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is as good as ours.
            if not (marker.is_file() and marker.read_text().strip() == DEMO_VLM_VERSION):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
