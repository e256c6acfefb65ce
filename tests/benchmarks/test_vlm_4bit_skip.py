"""The 4-bit VLM benchmarks keep the tower, projector and head 16-bit, as `sftop run` does.

transformers 5 matches `llm_int8_skip_modules` from the start of a module's full name, so a bare
"visual" left Qwen2.5-VL's tower (model.visual.*) in 4-bit: the benchmark measured another model
than the one `sftop run` trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from accelerate import init_empty_weights
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_bench  # noqa: E402
import vlm_shapes  # noqa: E402


@pytest.mark.parametrize("shape", ["qwen2.5-vl-3b", "gemma-3-4b"])
def test_step_bench_keeps_the_tower_16_bit_and_quantises_the_language_model(shape):
    cfg = step_bench._config(shape)
    skip = step_bench._vision_skip_modules(cfg)
    with init_empty_weights():
        model = vlm_shapes.model_class().from_config(cfg)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tower = [n for n in linears if ".visual." in n or ".vision_tower." in n or "projector" in n]
    language = [n for n in linears if ".language_model." in n]
    assert tower and language
    assert not any(should_convert_module(n, skip) for n in tower)
    assert all(should_convert_module(n, skip) for n in language)
    assert not should_convert_module("lm_head", skip)
