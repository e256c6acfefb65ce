"""Configs of real model shapes (no weights, no hub) and preset/GPU builders for the planner tests."""

from __future__ import annotations

from _fake_nvml import FakeNvml, gpu
from transformers import LlamaConfig, Qwen2Config

from sftop.engine.gpu import GpuStatus, read_gpus
from sftop.engine.presets.schema import Preset


def llama_1b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    )


def qwen_1_5b() -> Qwen2Config:
    return Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )


def llama_8b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )


def preset(
    name: str = "meta-llama/Llama-3.2-1B-Instruct",
    *,
    max_length: int = 2048,
    effective_batch: int = 16,
    load_in_4bit: bool = False,
    packing: bool = True,
    r: int = 16,
    optimizer: str = "adamw",
    **plan,
) -> Preset:
    return Preset.model_validate(
        {
            "name": "t",
            "model": {"name": name, "load_in_4bit": load_in_4bit},
            "lora": {"r": r},
            "data": {"max_length": max_length, "packing": packing},
            "train": {"effective_batch": effective_batch, "optimizer": optimizer},
            "plan": plan,
        }
    )


def one_gpu(total_gib: float, used_gib: float = 0.0) -> GpuStatus:
    return read_gpus(FakeNvml([gpu(0, total_gib, used=used_gib)]), env={})
