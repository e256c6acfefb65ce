"""The memory model against an H100 measurement (tests/planner/measured_h100_2026-11-23.json).

The fixture holds what benchmarks/planner_accuracy.py measured on 2026-11-23 (torch.cuda.max_memory_allocated of
two LoRA steps) for Llama-3.2-1B, Qwen2.5-1.5B and Llama-3.1-8B shapes x bf16/NF4 x stock ("trl": PEFT + TRL's
chunked head) and sftop's fused path ("sftop") x checkpointing x 512..16384 tokens, plus the planner's own
choices. These tests re-predict every row with the current estimate, so a change to estimate.py that moves a
prediction away from what the GPU did fails here.

Bounds: over-prediction costs speed (the solver picks checkpointing or smaller micro-batches than needed),
under-prediction risks an out-of-memory crash, so the band is asymmetric and tight on the low side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftop.engine.planner.estimate import GIB, ModelShape, Setup, estimate

FIXTURE = Path(__file__).with_name("measured_h100_2026-11-23.json")
DATA = json.loads(FIXTURE.read_text())
SHAPES = {name: ModelShape.from_config(cfg) for name, cfg in DATA["shapes"].items()}
ROWS = DATA["rows"]


def row_id(r: dict) -> str:
    what = "plan" if r.get("plan") else r["checkpointing"]
    return f"{r['shape']}-{r['weights']}-{r['loss']}-{what}-{r['tokens']}{'p' if r['packed'] else ''}"


def predicted_gib(r: dict) -> float:
    fused = r["loss"] == "sftop"
    setup = Setup(
        load_in_4bit=r["weights"] == "nf4",
        checkpointing=r["checkpointing"],
        checkpoint_every=r["every"],
        kernels=fused,
        loss="fused" if fused else "chunked",
        packed=r["packed"],
        # re-measured packed rows ran the varlen attention patch; torch 2.11's varlen API takes no
        # GQA flag, so K and V went in repeated
        attention=r.get("attention", "sdpa"),
        varlen_native_gqa=False,
    )
    return estimate(SHAPES[r["shape"]], setup, r["tokens"], seq_len=r["seq_len"]).allocated_bytes / GIB


def error(r: dict) -> float:
    return predicted_gib(r) / r["measured_gib"] - 1


@pytest.mark.parametrize("r", ROWS, ids=row_id)
def test_prediction_within_measured_band(r):
    err = error(r)
    # the fused path was re-derived from what its kernels save; against its 2026-12-02 re-measurement
    # (one logits chunk live, K/V kept repeated by GPU SDPA) it reaches -1.7%..+6.9%;
    # the stock path reaches -0.1%..+7.0%
    high = 0.07 if r["loss"] == "sftop" else 0.08
    assert -0.02 <= err <= high, f"predicted {predicted_gib(r):.2f} GiB, measured {r['measured_gib']:.2f} GiB"
