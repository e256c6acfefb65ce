"""Several CUDA GPUs (NCCL): DDP, FSDP2 and FSDP-QLoRA through the supervisor. Skipped below 2 GPUs.

Run on a machine with 2 or more GPUs:  pytest -m gpu tests/train/test_multigpu_gpu.py -q
(the CPU twins, with gloo, are in test_multiprocess.py)
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from sftop.engine.launch import rank_events_path, rank_pids
from sftop.engine.presets import load_preset
from sftop.engine.rundir import RunDir
from sftop.engine.supervisor import launch_run
from test_multiprocess import assert_same_curve, finish, losses, wait_for
from train_helpers import events_of, of_type

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

STEPS = 30
BASE = [
    "train.effective_batch=8",
    "data.max_length=64",
    "train.warmup_ratio=0.0",
    "train.logging_steps=1",
    f"train.max_steps={STEPS}",
    "train.save_steps=1000",
    "train.learning_rate=2e-3",
]


def start(path, overrides) -> RunDir:
    preset, _ = load_preset("demo", BASE + overrides)
    run = RunDir(path).create()
    launch_run(preset, run)
    return run


def test_two_gpus_ddp_matches_one_gpu_with_kernels(home, tmp_path):
    one = start(tmp_path / "one", ["plan.gpus=[0]", "plan.micro_batch=4", "plan.grad_accum=2"])
    assert finish(one, 600)["status"] == "finished", one.stdout_log.read_text()[-3000:]
    two = start(tmp_path / "two", ["plan.gpus=[0, 1]", "plan.micro_batch=2", "plan.grad_accum=2"])
    assert finish(two, 600)["status"] == "finished", two.stdout_log.read_text()[-3000:]
    # bf16 matmuls summed in another order: equal curves to about a percent
    assert_same_curve(one, two, STEPS, rel=2e-2, abs=2e-2)
    started = of_type(events_of(two.path), "run_started")[0]
    dist = started["environment"]["distributed"]
    assert (dist["world_size"], dist["backend"]) == (2, "nccl")
    assert "SFTOP_CUDA_GRAPHS=0" in started["kernels"]["parts"]["cuda_graphs"]
    assert started["plan"]["strategy"] == "ddp" and len(started["plan"]["per_gpu"]) == 2
    # each rank measured its own GPU's memory, within the plan's per-GPU peak
    rank1 = of_type(events_of_file(rank_events_path(two, 1)), "step")
    peak = started["plan"]["predicted_peak_gib"]
    for steps in (of_type(events_of(two.path), "step"), rank1):
        measured = max(s["gpu_mem_peak_gib"] for s in steps)
        assert 0 < measured <= peak * 1.1, (measured, peak)


def test_a_killed_rank_fails_the_run_on_gpus_without_a_hang(home, tmp_path):
    run = start(tmp_path / "killed", ["plan.gpus=2", f"train.max_steps={STEPS * 20}"])
    wait_for(lambda: len(losses(run)) >= 2 and 1 in rank_pids(run), 600, "two steps")
    os.kill(rank_pids(run)[1], signal.SIGKILL)
    # NCCL may not notice a lost peer by itself: torchrun stops the others (SIGTERM, then SIGKILL after 30 s)
    status = finish(run, timeout=180)
    assert status["status"] == "failed"
    assert events_of(run.path)[-1]["reason"].startswith("rank 1 of 2 was killed by signal SIGKILL")


def test_two_gpus_fsdp2_matches_one_gpu_and_shards_every_weight(home, tmp_path):
    """FSDP2 (NCCL, bf16 mixed precision: fp32 adapter master weights, bf16 compute) against one GPU,
    both with the stock layers (FSDP2 turns sftop's kernels off)."""
    stock = ['train.kernels="off"']
    one = start(tmp_path / "one", stock + ["plan.gpus=[0]", "plan.micro_batch=4", "plan.grad_accum=2"])
    assert finish(one, 600)["status"] == "finished", one.stdout_log.read_text()[-3000:]
    two = start(
        tmp_path / "fsdp2",
        stock + ["plan.gpus=[0, 1]", 'plan.strategy="fsdp2"', "plan.micro_batch=2", "plan.grad_accum=2"],
    )
    assert finish(two, 600)["status"] == "finished", two.stdout_log.read_text()[-3000:]
    assert_same_curve(one, two, STEPS, rel=2e-2, abs=2e-2)
    started = of_type(events_of(two.path), "run_started")[0]
    dist = started["environment"]["distributed"]
    assert (dist["world_size"], dist["backend"], dist["strategy"]) == (2, "nccl", "fsdp2")
    assert dist["parameters"]["sharded"] == dist["parameters"]["total"]
    assert started["environment"]["model"]["device"].startswith("cuda")
    peak = started["plan"]["predicted_peak_gib"]
    for steps in (of_type(events_of(two.path), "step"), of_type(events_of_file(rank_events_path(two, 1)), "step")):
        measured = max(s["gpu_mem_peak_gib"] for s in steps)
        assert 0 < measured <= peak * 1.1, (measured, peak)
    assert (two.adapter / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("where", ["gpu", "cpu"])
def test_fsdp_qlora_on_two_gpus_quantized_on_either_device(home, tmp_path, monkeypatch, where):
    """FSDP-QLoRA: the 4-bit weights stored in bf16 and sharded; quantized on each GPU (the weights fit
    one) or in host memory with each GPU receiving its shard (the path for weights that do not)."""
    monkeypatch.setenv("SFTOP_FSDP2_LOAD_4BIT", where)
    run = start(
        tmp_path / where,
        [
            "plan.gpus=[0, 1]",
            'plan.strategy="fsdp2"',
            "model.load_in_4bit=true",
            "plan.micro_batch=2",
            "plan.grad_accum=2",
        ],
    )
    assert finish(run, 600)["status"] == "finished", run.stdout_log.read_text()[-3000:]
    curve = losses(run)
    assert sorted(curve) == list(range(1, STEPS + 1)) and curve[STEPS] < curve[1]
    started = of_type(events_of(run.path), "run_started")[0]
    assert started["plan"]["load_in_4bit"] and started["plan"]["strategy"] == "fsdp2"
    dist = started["environment"]["distributed"]
    assert dist["backend"] == "nccl" and dist["parameters"]["sharded"] == dist["parameters"]["total"]
    notes = [m["text"] for m in of_type(events_of(run.path), "message")]
    assert any(f"quantized on the {where.upper()}" in n for n in notes), notes
    assert (run.adapter / "adapter_model.safetensors").is_file()


def events_of_file(path):
    from sftop.engine.events import read_events

    records, _ = read_events(path)
    return records
