"""Several processes on the CPU (gloo), launched by the supervisor through `accelerate launch`.

One module fixture trains the demo model for the same steps as one process and as two; the tests
compare them, stop and resume a two-process run, and kill a rank. Tolerance for "equal losses":
relative 1e-5 (measured: the two runs agree to about 1e-7; the order of the gradient sums differs).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from sftop.engine.launch import rank_events_path, rank_memory, rank_pids
from sftop.engine.presets import load_preset
from sftop.engine.rundir import RunDir
from sftop.engine.runs import stop_run
from sftop.engine.supervisor import launch_run
from sftop.engine.train.trainer import checkpoint_is_complete
from train_helpers import events_of, in_home, of_type

pytestmark = pytest.mark.slow

STEPS = 50
BASE = [
    'train.kernels="off"',
    "train.effective_batch=4",
    "data.max_length=32",
    "train.warmup_ratio=0.0",
    "train.logging_steps=1",
    f"train.max_steps={STEPS}",
    "train.save_steps=1000",
    "train.learning_rate=2e-3",
]
# several processes split each step by rows (the Trainer's sharding): the one-process reference does too
ONE = BASE + ["plan.micro_batch=4", "plan.grad_accum=1", 'plan.split_by="rows"']
TWO = BASE + ["plan.micro_batch=2", "plan.grad_accum=1", "plan.gpus=2", 'plan.device="cpu"']
DONE = ("finished", "failed", "stopped")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def start(run_path, overrides, resume=False) -> RunDir:
    preset, _ = load_preset("demo", overrides)
    run = RunDir(run_path)
    launch_run(preset, run if resume else run.create(), resume=resume)
    return run


def finish(run: RunDir, timeout: float = 240) -> dict:
    return wait_for(lambda: run.read_status().get("status") in DONE and run.read_status(), timeout, "the run's end")


def losses(run: RunDir, since: float = 0.0) -> dict[int, float]:
    return {s["step"]: s["loss"] for s in of_type(events_of(run.path), "step") if s["time"] >= since}


def assert_same_curve(one: RunDir, two: RunDir, steps: int, **tolerance) -> dict[int, float]:
    """Both runs logged each of their `steps` steps and the same loss at each, within `tolerance`
    (pytest.approx's rel and abs); returns the first run's losses."""
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], **tolerance), step
    return a


def train_one_and_two(sftop_home, root, one_overrides, two_overrides) -> tuple[RunDir, RunDir]:
    """Train the same steps with each set of overrides, one after the other, both to their end."""
    mp = in_home(sftop_home)
    try:
        one = start(root / "one", one_overrides)
        assert finish(one)["status"] == "finished", one.stdout_log.read_text()[-3000:]
        two = start(root / "two", two_overrides)
        assert finish(two)["status"] == "finished", two.stdout_log.read_text()[-3000:]
    finally:
        mp.undo()
    return one, two


@pytest.fixture(scope="module")
def runs(sftop_home, tmp_path_factory):
    return train_one_and_two(sftop_home, tmp_path_factory.mktemp("multiprocess"), ONE, TWO)


def test_two_processes_train_like_one_at_the_same_effective_batch(runs):
    one, two = runs
    a = assert_same_curve(one, two, STEPS, rel=1e-5)
    assert a[STEPS] < a[1] * 0.8  # it learned: equal curves that go somewhere
    # tokens/s and tokens_seen count every rank's tokens
    seen = [of_type(events_of(r.path), "step")[-1]["tokens_seen"] for r in (one, two)]
    assert seen[0] == seen[1] > 0

    started = of_type(events_of(two.path), "run_started")[0]
    dist = started["environment"]["distributed"]
    assert (dist["world_size"], dist["backend"], dist["strategy"]) == (2, "gloo", "ddp")
    assert dist["cuda_graphs"].startswith("off:")
    plan = started["plan"]
    assert (plan["world_size"], plan["micro_batch"], plan["grad_accum"], plan["effective_batch"]) == (2, 2, 1, 4)
    assert two.read_status()["world_size"] == 2
    # only rank 0 writes the run's events; rank 1 its own file, with its steps (and their memory fields)
    assert len(of_type(events_of(two.path), "run_started")) == 1
    rank1 = [json.loads(line) for line in rank_events_path(two, 1).read_text().splitlines() if line.strip()]
    assert len(of_type(rank1, "step")) == STEPS and "gpu_mem_peak_gib" in of_type(rank1, "step")[-1]
    assert sorted(rank_memory(two)) == [0, 1]
    # reproducible by hand: the launcher's config and command are in the run directory
    assert "num_processes: 2" in (two.path / "accelerate.yaml").read_text()
    script = (two.path / "launch.sh").read_text()
    assert "accelerate.commands.launch" in script and "--num_processes 2" in script
    assert "ACCELERATE_USE_CPU=true" in script
    checkpoint = two.latest_checkpoint()
    assert checkpoint_is_complete(checkpoint)
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert (two.adapter / "adapter_model.safetensors").is_file()


def stop_here(run: RunDir, since: float, steps: int = STEPS) -> int:
    """Stop `run` (of `steps` steps) once it trained two steps after `since`; the step it stopped at, checked."""
    wait_for(lambda: len(losses(run, since)) >= 2, 240, "two steps")
    message = stop_run(run, wait=120)
    # the run directory is named "stopped" too: the status must follow the name
    assert message.startswith(f"Run {run.name} stopped"), (message, run.stdout_log.read_text()[-3000:])
    status = run.read_status()
    assert status["status"] == "stopped" and status["exit_code"] == 0
    stopped = events_of(run.path)[-1]
    assert stopped["type"] == "run_stopped" and stopped["signal"] == "SIGTERM"
    step = stopped["step"]
    assert 2 <= step < steps
    checkpoint = run.path / "checkpoints" / f"checkpoint-{step}"
    assert checkpoint_is_complete(checkpoint)
    assert not list((run.path / "checkpoints").glob(".saving-*"))
    return step


def test_stop_resume_on_two_then_on_one_process_continues_the_same_curve(runs, home, tmp_path):
    _, reference = runs
    ref = losses(reference)
    run = start(tmp_path / "stopped", TWO)
    first = stop_here(run, 0.0)
    assert (run.path / "checkpoints" / f"checkpoint-{first}" / "rng_state_1.pth").is_file()  # every rank saved

    # the same number of processes
    resumed_at = time.time()
    start(run.path, TWO, resume=True)
    second = stop_here(run, resumed_at)
    assert second > first
    after = losses(run, since=resumed_at)
    assert sorted(after) == list(range(first + 1, second + 1))
    for s, loss in after.items():
        assert loss == pytest.approx(ref[s], rel=1e-5), s

    # a different number: one process takes the next effective-batch rows at each step, as two did
    resumed_at = time.time()
    start(run.path, TWO + ["plan.gpus=1"], resume=True)
    assert finish(run)["status"] == "finished", run.stdout_log.read_text()[-3000:]
    after = losses(run, since=resumed_at)
    assert sorted(after) == list(range(second + 1, STEPS + 1))
    for s, loss in after.items():
        assert loss == pytest.approx(ref[s], rel=1e-5), s
    notes = [m["text"] for m in of_type(events_of(run.path), "message")]
    assert any("Resuming on 1 process instead of 2" in n for n in notes), notes
    started = of_type(events_of(run.path), "run_started")[-1]
    assert (started["plan"]["world_size"], started["plan"]["micro_batch"] * started["plan"]["grad_accum"]) == (1, 4)


def test_a_killed_rank_fails_the_run_naming_it(home, tmp_path):
    run = start(tmp_path / "killed", TWO)
    wait_for(lambda: len(losses(run)) >= 1 and 1 in rank_pids(run), 240, "a step")
    os.kill(rank_pids(run)[1], signal.SIGKILL)
    status = finish(run, timeout=120)  # never a hang: gloo notices the lost peer, torchrun stops the rest
    assert status["status"] == "failed"
    last = events_of(run.path)[-1]
    assert last["type"] == "run_failed"
    assert last["reason"].startswith("rank 1 of 2 was killed by signal SIGKILL"), last["reason"]
    assert len(of_type(events_of(run.path), "run_failed")) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_like_one_process(runs, home, tmp_path):
    """plan.nodes: two `sftop run`s, each one CPU process, meet at the main node's address; each node
    keeps its own run directory with whole checkpoints and its adapter."""
    one, _ = runs
    port = _free_port()
    nodes = BASE + [
        "plan.micro_batch=2",
        "plan.grad_accum=1",
        "plan.gpus=1",
        'plan.device="cpu"',
        "plan.nodes=2",
        'plan.main_address="127.0.0.1"',
        f"plan.main_port={port}",
    ]
    main = start(tmp_path / "node0", nodes + ["plan.node_rank=0"])
    other = start(tmp_path / "node1", nodes + ["plan.node_rank=1"])
    for run in (main, other):
        assert finish(run)["status"] == "finished", run.stdout_log.read_text()[-3000:]
    a, b = losses(one), losses(main)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    config = (other.path / "accelerate.yaml").read_text()
    assert "num_machines: 2" in config and "machine_rank: 1" in config and '"127.0.0.1"' in config
    assert f"main_process_port: {port}" in config and "num_processes: 2" in config
    # the other node: its record in its first rank's file, its own sealed checkpoint and adapter
    ended = [json.loads(x) for x in rank_events_path(other, 1).read_text().splitlines() if x.strip()][-1]
    assert ended["type"] == "run_finished" and ended["step"] == STEPS
    assert checkpoint_is_complete(other.latest_checkpoint()) and (other.adapter / "adapter_config.json").is_file()
    assert of_type(events_of(main.path), "run_started")[0]["plan"]["world_size"] == 2
