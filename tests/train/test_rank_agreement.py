"""The decisions every rank of a multi-process run must take at the same step.

Stop and "checkpoint now" requests reach the ranks at different steps.

`sftop stop` writes the stop file and signals each rank, so one rank may see the request a step
before another; the first rank to see a checkpoint request removes its file, so another may never
see it. Two real processes joined over gloo run a stand-in training loop (a gradient all-reduce
per step, then the trainer callback's checks, then a checkpoint barrier): both must save and stop
at the step the first rank saw each request, and neither may wait in a collective the other skipped.
A loss that is not finite on one rank only must make every rank skip that update.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
from pathlib import Path

STEPS = 8
SEEN_AT = {0: 3, 1: 4}  # the step at which each rank first has its own stop request
CHECKPOINT_AT = 1  # only rank 0 sees the checkpoint request, at this step


def _rank(rank: int, init_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from sftop.engine.train.callbacks import RunEvents
    from sftop.engine.train.distributed import agreed_stop

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20)
    )
    try:
        request = Path(out).with_suffix(".checkpoint")  # each rank's own view of the request file
        events = RunEvents(None, started=None, stop_requested=None, checkpoint_request=request)
        answers, grad_sums, saves = [], [], []
        for step in range(STEPS):
            grad = torch.tensor([float(rank + step)])
            dist.all_reduce(grad)  # the step's gradient sum, as DDP does before the callbacks run
            grad_sums.append(float(grad))
            if rank == 0 and step == CHECKPOINT_AT:
                request.write_text("now")
            saves.append(events._checkpoint_wanted())
            stop = agreed_stop("SIGTERM" if step >= SEEN_AT[rank] else None)
            answers.append(stop)
            if stop:
                break
        saved = torch.tensor([1.0])
        dist.all_reduce(saved)  # every rank writes its part of the checkpoint, then they meet
        result = {
            "answers": answers,
            "grad_sums": grad_sums,
            "saves": saves,
            "request_left": request.exists(),
            "saved_by": float(saved),
        }
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path: Path, target) -> list[dict]:
    """Run `target(rank, init_file, out)` in two spawned processes; each rank's JSON result."""
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=target, args=(r, str(tmp_path / "init"), str(outs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0, 0], f"a rank hung or failed: exit codes {codes}"
    return [json.loads(o.read_text()) for o in outs]


def test_ranks_stop_at_the_step_the_first_of_them_saw_the_request(tmp_path):
    zero, one = _run_two(tmp_path, _rank)
    first = min(SEEN_AT.values())
    # both stopped at the first rank's step; the rank without its own request stopped on the agreed one
    assert zero["answers"] == one["answers"] == [None] * first + ["SIGTERM"]
    # every collective paired with its twin: the same sums on both ranks, and both met at the save
    assert zero["grad_sums"] == one["grad_sums"] == [float(2 * s + 1) for s in range(first + 1)]
    assert zero["saved_by"] == one["saved_by"] == 2.0
    # the checkpoint request only rank 0 saw: both saved at that step, once, and the file was consumed
    saves = [step == CHECKPOINT_AT for step in range(first + 1)]
    assert zero["saves"] == one["saves"] == saves
    assert not zero["request_left"]


BAD_LOSS_AT = 1  # only rank 0's micro-batch loss is NaN, at this step; the gradients stay finite


def _guard_rank(rank: int, init_file: str, out: str) -> None:
    import types

    import torch
    import torch.distributed as dist

    from sftop.engine.train.update_guard import UpdateGuard

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20)
    )
    try:
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = types.SimpleNamespace(param_groups=[{"params": [weight]}])
        guard = UpdateGuard(max_bad_steps=3)
        skipped, dropped = [], []
        for step in range(3):
            weight.grad = torch.ones(3)  # the same all-reduced gradients on both ranks
            loss = torch.tensor(float("nan") if rank == 0 and step == BAD_LOSS_AT else 1.5)
            guard.note_loss(loss)
            guard.on_pre_optimizer_step(None, None, None, optimizer=optimizer)
            skipped.append(guard.step_bad)
            dropped.append(weight.grad is None)
        result = {"skipped": skipped, "dropped": dropped, "consecutive": guard.consecutive}
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def test_a_loss_bad_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    zero, one = _run_two(tmp_path, _guard_rank)
    bad = [step == BAD_LOSS_AT for step in range(3)]
    assert zero == one == {"skipped": bad, "dropped": bad, "consecutive": 0}


def test_outside_a_process_group_the_rank_keeps_its_own_answers(tmp_path):
    from sftop.engine.train.callbacks import RunEvents
    from sftop.engine.train.distributed import agreed_stop

    assert agreed_stop(None) is None
    assert agreed_stop("SIGINT") == "SIGINT"
    request = tmp_path / "checkpoint"
    events = RunEvents(None, started=None, stop_requested=None, checkpoint_request=request)
    assert events._checkpoint_wanted() is False
    request.write_text("now")
    assert events._checkpoint_wanted() is True and not request.exists()  # one request, one save
    assert events._checkpoint_wanted() is False
