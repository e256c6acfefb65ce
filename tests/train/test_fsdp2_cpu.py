"""FSDP2 on the CPU (gloo): the demo model's weights sharded over two processes through accelerate's
FSDP plugin (fsdp_version 2), launched by the supervisor like any multi-process run.

One module fixture trains the same steps as one process and as two FSDP2 processes; the tests
compare them, then stop a two-process FSDP2 run and resume it on three. Tolerance for "equal
losses": relative 1e-5 (measured: they agree to about 1e-7, the gradient sums' order differs).
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from sftop.engine.errors import PresetError
from sftop.engine.train.fsdp import cpu_4bit_allowed, refuse_single_process_resume
from sftop.engine.train.trainer import checkpoint_problem, is_fsdp_checkpoint
from test_multiprocess import assert_same_curve, finish, losses, start, stop_here, train_one_and_two
from train_helpers import events_of, of_type

pytestmark = pytest.mark.slow

STEPS = 30
BASE = [
    'train.kernels="off"',
    "train.effective_batch=6",  # splits over 1, 2 and 3 processes
    "data.max_length=32",
    "train.warmup_ratio=0.0",
    "train.logging_steps=1",
    f"train.max_steps={STEPS}",
    "train.save_steps=1000",
    "train.learning_rate=2e-3",
]
ONE = BASE + ["plan.micro_batch=6", "plan.grad_accum=1", 'plan.split_by="rows"']
FSDP2 = BASE + ['plan.device="cpu"', 'plan.strategy="fsdp2"', "plan.micro_batch=3", "plan.grad_accum=1", "plan.gpus=2"]


@pytest.fixture(scope="module")
def runs(sftop_home, tmp_path_factory):
    return train_one_and_two(sftop_home, tmp_path_factory.mktemp("fsdp2"), ONE, FSDP2)


def test_fsdp2_on_two_processes_trains_like_one_process(runs):
    one, two = runs
    a = assert_same_curve(one, two, STEPS, rel=1e-5)
    assert a[STEPS] < a[1] * 0.8  # it learned

    started = of_type(events_of(two.path), "run_started")[0]
    dist = started["environment"]["distributed"]
    assert (dist["world_size"], dist["backend"], dist["strategy"]) == (2, "gloo", "fsdp2")
    assert started["plan"]["strategy"] == "fsdp2" and started["plan"]["world_size"] == 2
    # the weights really are sharded: every parameter, the trainable adapter's too, is a DTensor shard
    params = dist["parameters"]
    assert params["sharded"] == params["total"] > 0 and params["trainable_sharded"] > 0
    for part in ("cuda_graphs", "kernels", "checkpoint_offload"):
        assert dist[part].startswith("off:"), part
    # reproducible by hand: accelerate's FSDP plugin, version 2, one unit per decoder layer
    config = (two.path / "accelerate.yaml").read_text()
    assert 'distributed_type: "FSDP"' in config and "fsdp_version: 2" in config
    assert 'fsdp_transformer_layer_cls_to_wrap: "LlamaDecoderLayer"' in config
    assert 'fsdp_state_dict_type: "FULL_STATE_DICT"' in config

    # the adapter is saved whole (gathered), loadable like a one-process run's, and trained alike
    mine, ref = (load_file(str(r.adapter / "adapter_model.safetensors")) for r in (two, one))
    assert sorted(mine) == sorted(ref) and mine
    for key in ref:
        assert mine[key].shape == ref[key].shape, key
        assert torch.allclose(mine[key], ref[key], rtol=1e-3, atol=1e-5), key
    checkpoint = two.latest_checkpoint()
    assert checkpoint_problem(checkpoint) is None and is_fsdp_checkpoint(checkpoint)


def test_fsdp2_stop_then_resume_on_three_processes_continues_the_curve(runs, home, tmp_path):
    _, reference = runs
    ref = losses(reference)
    run = start(tmp_path / "stopped", FSDP2)
    first = stop_here(run, 0.0, steps=STEPS)
    checkpoint = run.path / "checkpoints" / f"checkpoint-{first}"
    assert is_fsdp_checkpoint(checkpoint) and (checkpoint / "rng_state_1.pth").is_file()  # every rank saved

    # a different number of processes: the whole (gathered) state loads into 3 shards; plan.strategy
    # left to "auto" (DDP on CPU processes), the FSDP2 checkpoint keeps the resume on FSDP2
    resumed_at = time.time()
    start(run.path, [o for o in FSDP2 if "strategy" not in o] + ["plan.gpus=3"], resume=True)
    assert finish(run)["status"] == "finished", run.stdout_log.read_text()[-3000:]
    after = losses(run, since=resumed_at)
    assert sorted(after) == list(range(first + 1, STEPS + 1))
    for s, loss in after.items():
        assert loss == pytest.approx(ref[s], rel=1e-5), s
    started = of_type(events_of(run.path), "run_started")[-1]
    assert (started["plan"]["world_size"], started["plan"]["strategy"]) == (3, "fsdp2")
    assert started["resumed_from_step"] == first

    # one process cannot read accelerate's FSDP files: refused with what to do
    with pytest.raises(PresetError, match="plan.gpus = 2 or more"):
        refuse_single_process_resume(checkpoint, 1)
    refuse_single_process_resume(checkpoint, 3)


def test_fsdp_qlora_shards_the_4bit_weights_on_cpu_processes(runs, home, tmp_path):
    """FSDP-QLoRA's CPU twin: bitsandbytes quantizes on the CPU with the packed 4-bit weights stored in
    the compute dtype, and FSDP2 shards them like any other weight (a one-process CPU run stays refused)."""
    one, _ = runs
    steps = 8
    run = start(tmp_path / "qlora", [*FSDP2, "model.load_in_4bit=true", f"train.max_steps={steps}"])
    assert finish(run)["status"] == "finished", run.stdout_log.read_text()[-3000:]
    curve = losses(run)
    assert sorted(curve) == list(range(1, steps + 1)) and curve[steps] < curve[1] * 0.8
    # 4-bit weights train to about the same curve as the 16-bit ones (NF4 rounding apart)
    for step in (1, 2):
        assert curve[step] == pytest.approx(losses(one)[step], rel=0.1), step
    started = of_type(events_of(run.path), "run_started")[0]
    assert started["environment"]["model"]["load_in_4bit"] and started["plan"]["load_in_4bit"]
    params = started["environment"]["distributed"]["parameters"]
    assert params["sharded"] == params["total"] and params["trainable_sharded"] > 0
    saved = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(load_file(str(one.adapter / "adapter_model.safetensors")))
    assert not cpu_4bit_allowed()  # this test process is no FSDP2 rank: CPU 4-bit stays refused here
