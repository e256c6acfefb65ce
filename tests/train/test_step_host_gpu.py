"""A packed, bucketed run on a CUDA GPU replays its buckets' graphs without listing the model per
micro-batch (sftop/kernels/graph_layout.py). Skipped without a GPU.

Run on a GPU machine:  pytest -m gpu tests/train/test_step_host_gpu.py -q
"""

import pytest
import torch

from sftop.kernels import packed_graphs as pg
from train_helpers import events_of, of_type, prepared_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bucket_replays_read_the_model_from_its_list(home, tmp_path):
    from sftop.engine.presets import load_preset

    preset, _ = load_preset(
        "demo",
        [
            "train.max_steps=20",
            "train.save_steps=8",  # saving on the way must not make the next steps list the model again
            "train.effective_batch=4",
            "plan.micro_batch=4",
            'plan.gradient_checkpointing="off"',
            'train.length_buckets="on"',
            "train.sample_prompts=[]",
        ],
    )
    run, writer = prepared_run(preset, tmp_path / "run")
    trainer = run.build_trainer()
    assert run.packed_graphs_on(), run.info.kernels["parts"]
    trainer.train()
    writer.close()
    stats = pg.packed_graph_stats(trainer.model)
    layout = pg.causal_lm(trainer.model).__dict__[pg._PACKED_GRAPHS].layout
    assert stats is not None and stats.replays >= 5 and not stats.failures, stats
    # listed when the graphs were made and before each capture, never per replay
    assert layout.scans <= 1 + stats.captures, (layout.scans, stats)
    steps = of_type(events_of(run.run_dir.path), "step")
    assert len(steps) == 20 and all(s["loss"] is not None and s["loss"] > 0 for s in steps)
