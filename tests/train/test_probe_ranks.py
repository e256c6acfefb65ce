"""The startup probe of a data-parallel run: every rank probes, and all take the fullest GPU's verdict.

Two real processes joined over gloo run the planner's probe loop (`run_probe`) with the helpers the
trainer wraps it in under DDP (`RanksMemory`, `probe_on_every_rank`). Their GPUs are simulated by
allocator counters that differ per rank (rank 1 needs 40 % more memory per token and runs out of
memory on large batches, as a card shared with another process would): the ranks must end on the
same plan through the same verdicts, or they would train different micro-batches and hang.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLANNER_TESTS = HERE.parent / "planner"
GPU_TESTS = HERE.parent / "gpu"


def _rank(rank: int, init_file: str, out: str, mode: str) -> None:
    sys.path[:0] = [str(PLANNER_TESTS), str(GPU_TESTS)]
    import torch.distributed as dist
    from _shapes import llama_1b, one_gpu, preset
    from test_planner_verify import FakeMemory

    from sftop.engine.gpu import GIB
    from sftop.engine.planner import plan_run, run_probe
    from sftop.engine.train.distributed import RanksMemory, probe_on_every_rank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        plan = plan_run(preset(), llama_1b(), gpus=one_gpu(24))
        local = FakeMemory()
        per_token = 300_000 * (1.4 if rank == 1 else 1.0)

        def step(rows, tokens):
            if rank == 1 and tokens > 4096:
                local.peak = int(3 * GIB)
                raise FakeMemory.OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
            local.peak = int(2.3 * GIB + per_token * tokens)

        memory = RanksMemory(local) if mode == "agreed" else local
        fn = probe_on_every_rank(step, memory.oom_error) if mode == "agreed" else step
        final, verdicts = run_probe(plan, fn, memory=memory)
        result = {
            "micro_batch": final.micro_batch,
            "tokens_per_micro_batch": final.tokens_per_micro_batch,
            "checkpointing": final.gradient_checkpointing,
            "verdicts": [(v.ok, v.measured_gib) for v in verdicts],
            "reasons": [v.reason for v in verdicts],
        }
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path: Path, mode: str) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"{mode}-rank{r}.json" for r in range(2)]
    init = tmp_path / f"{mode}-init"
    procs = [ctx.Process(target=_rank, args=(r, str(init), str(outs[r]), mode)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"a rank failed ({mode}): exit {p.exitcode}"
    return [json.loads(o.read_text()) for o in outs]


def test_ranks_probe_to_the_same_plan_judged_by_the_fullest_gpu(tmp_path):
    zero, one = _run_two(tmp_path, "agreed")
    reasons = zero.pop("reasons"), one.pop("reasons")
    assert zero == one  # the same verdicts, peaks and final plan on both ranks
    # rank 1's out-of-memory step stepped rank 0 down too, each saying where it happened
    assert "CUDA out of memory" in reasons[1][0] and "out of memory on another rank" in reasons[0][0]
    assert zero["verdicts"][0][0] is False and zero["verdicts"][-1][0] is True
    # the fitting plan was judged on rank 1's larger peak, not rank 0's own
    tokens = zero["tokens_per_micro_batch"]
    assert zero["verdicts"][-1][1] == round((2.3 * 2**30 + 1.4 * 300_000 * tokens) / 2**30, 3)
    assert zero["tokens_per_micro_batch"] <= 4096


def test_without_agreement_the_ranks_would_train_different_plans(tmp_path):
    # the failure the helpers prevent: each rank judged alone keeps or drops the plan by itself
    zero, one = _run_two(tmp_path, "alone")
    assert zero["verdicts"][0][0] is True and one["verdicts"][0][0] is False
    assert zero["tokens_per_micro_batch"] != one["tokens_per_micro_batch"]
