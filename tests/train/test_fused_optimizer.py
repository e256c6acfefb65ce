"""The optimizer step is torch's fused AdamW over all LoRA parameters, and updates exactly as the
one-parameter-at-a-time AdamW does."""

import pytest
import torch
from transformers import Trainer

from sftop.engine.train.config import build_sft_config, fused_adamw_available, optimizer_name
from train_helpers import fast_preset


def test_the_run_uses_fused_adamw_where_torch_has_it(tmp_path):
    assert optimizer_name("adamw", on_cuda=False) == (
        "adamw_torch_fused" if fused_adamw_available("cpu") else "adamw_torch",
        None,
    )
    if not fused_adamw_available("cpu"):
        pytest.skip("this torch has no fused AdamW for the CPU")
    preset = fast_preset()
    plan = type("P", (), {"micro_batch": 4, "grad_accum": 1, "gradient_checkpointing": "off"})()
    args = build_sft_config(
        preset, plan, output_dir=tmp_path, dtype="fp32", packing=True, has_eval=False, on_cuda=False
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW and kwargs.get("fused") is True


def test_fused_update_equals_the_unfused_one():
    if not fused_adamw_available("cpu"):
        pytest.skip("this torch has no fused AdamW for the CPU")
    gen = torch.Generator().manual_seed(0)
    # LoRA-like shapes: A (r x in) and B (out x r) for a few projections, odd sizes
    shapes = [(8, 37), (53, 8), (8, 53), (29, 8), (16, 101), (7, 16)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    results = []
    for fused in (True, False):
        params = [t.clone().requires_grad_(True) for t in start]
        opt = torch.optim.AdamW(
            params,
            lr=2e-3,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.01,
            fused=fused,
            foreach=None if fused else False,
        )
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for fused_p, plain_p, s in zip(*results, start):
        assert not torch.equal(fused_p, s)  # the step moved the weights
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-6, atol=1e-7)


def test_prefetching_workers_give_the_same_batches(home, tmp_path):
    """On a GPU the data loader collates in a worker process ahead of the step; the batches (order,
    packing, bucket padding) must be exactly those the training process would collate itself."""
    from sftop.engine.events import EventWriter
    from sftop.engine.rundir import RunDir
    from sftop.engine.train.config import dataloader_settings
    from sftop.engine.train.runner import _Run

    from transformers.trainer_pt_utils import AcceleratorConfig

    gpu = dataloader_settings(on_cuda=True)
    assert gpu["dataloader_num_workers"] >= 1 and gpu["dataloader_pin_memory"]
    assert AcceleratorConfig(**gpu["accelerator_config"]).non_blocking is True  # copies queued, not waited for
    gpu = {k: v for k, v in gpu.items() if k != "accelerator_config"}  # set on the accelerator, not per loader
    assert dataloader_settings(on_cuda=False) == {"dataloader_num_workers": 0}
    run_dir = RunDir(tmp_path / "run").create()
    writer = EventWriter(run_dir.events)
    run = _Run(fast_preset('train.length_buckets="on"', "train.max_steps=2"), run_dir, writer, resume=False)
    run.resolve()
    run.load()
    trainer = run.build_trainer()
    batches = []
    for settings in (dataloader_settings(on_cuda=False), {**gpu, "dataloader_pin_memory": False}):
        for key, value in settings.items():
            setattr(trainer.args, key, value)
        batches.append([dict(b) for b in trainer.get_train_dataloader()])
    writer.close()
    inline, prefetched = batches
    assert len(inline) == len(prefetched) > 2
    for a, b in zip(inline, prefetched):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
