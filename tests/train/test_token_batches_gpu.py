"""Token-split micro-batches on a CUDA GPU, through sftop's fused loss (bf16), probe and CUDA graphs.
Skipped without a GPU.

Run on a GPU machine:  pytest -m gpu tests/train/test_token_batches_gpu.py -q
"""

import pytest
import torch

from sftop.engine.presets import load_preset
from sftop.engine.train.runner import run_training
from train_helpers import events_of, of_type

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_split_step_trains_as_one_micro_batch_with_fused_kernels(home, tmp_path):
    """8 rows per step in 2 token-balanced micro-batches vs the same 8 rows in one (fused linear+CE
    normalised by the step's label tokens): the same losses within bf16 noise, the probe at the
    plan's largest micro-batch."""
    runs = {}
    for micro in (8, 4):
        preset, _ = load_preset(
            "demo",
            [
                "train.max_steps=6",
                "train.save_steps=100",
                "train.effective_batch=8",
                f"plan.micro_batch={micro}",
                'plan.split_by="tokens"',
                'plan.gradient_checkpointing="off"',
            ],
        )
        assert run_training(preset, tmp_path / str(micro)) == 0
        records = events_of(tmp_path / str(micro))
        assert records[-1]["type"] == "run_finished", records[-3:]
        plan = of_type(records, "run_started")[0]["plan"]
        assert (plan["split_by"], plan["grad_accum"]) == ("tokens", 8 // micro)
        assert plan["probe"]["ok"] is True, plan["probe"]
        runs[micro] = of_type(records, "step")
    whole, split = runs[8], runs[4]
    assert [s["tokens_seen"] for s in split] == [s["tokens_seen"] for s in whole]
    for a, b in zip(split, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
