"""The dashboard's "checkpoint now" key: the trainer saves at the end of the current step."""

import time

from sftop.engine.rundir import RunDir
from sftop.engine.runs import request_checkpoint
from sftop.engine.train.trainer import checkpoint_is_complete
from train_helpers import events_of, of_type, start_trainer, wait_for_steps

STEPS = 12
RUN = [f"train.max_steps={STEPS}", "train.save_steps=100"]  # no scheduled save before the end


def test_checkpoint_request_saves_mid_run_and_is_consumed(home, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_trainer(run_dir, RUN, home)
    wait_for_steps(run_dir, 2, proc)
    request = request_checkpoint(RunDir(run_dir))
    deadline = time.time() + 120
    saved = []
    while time.time() < deadline and not saved:
        saved = [c for c in of_type(events_of(run_dir), "checkpoint") if c["step"] < STEPS]
        time.sleep(0.2)
    assert proc.wait(timeout=240) == 0
    assert saved, "no checkpoint was written after the request"
    step = saved[0]["step"]
    assert 2 <= step < STEPS
    assert checkpoint_is_complete(run_dir / "checkpoints" / f"checkpoint-{step}")
    assert not request.exists()  # consumed: one request, one save
    mid_run = [c["step"] for c in of_type(events_of(run_dir), "checkpoint") if c["step"] < STEPS]
    assert mid_run == [step]
    assert events_of(run_dir)[-1]["type"] == "run_finished"
