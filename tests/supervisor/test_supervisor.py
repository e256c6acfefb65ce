import os
import time

import pytest

from sftop.engine.errors import SftopError
from sftop.engine.events import read_events
from sftop.engine.presets import load_preset
from sftop.engine.rundir import new_run_dir
from sftop.engine.runs import EventFollower, find_run, list_runs, request_checkpoint, stop_run, summarize
from sftop.engine.supervisor import launch_run, process_alive


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def final_status(run):
    return wait_for(lambda: run.read_status().get("status") in ("finished", "failed", "stopped") and run.read_status())


def test_detached_supervisor_records_a_finished_run(fake_trainer):
    run = new_run_dir("demo")
    launched = launch_run("demo", run, command=fake_trainer(run, steps=3))
    assert launched == run
    assert run.preset.read_text().startswith('name = "demo"')
    status = final_status(run)
    assert status["status"] == "finished"
    assert status["exit_code"] == 0
    assert status["pid"] != status["supervisor_pid"]
    assert status["pgid"] == status["pid"]
    assert status["started"] <= status["ended"]
    # Its own session: an SSH hangup of ours never reaches it.
    assert status["supervisor_session"] != os.getsid(0)
    summary = summarize(run)
    assert (summary.status, summary.step, summary.total_steps) == ("finished", 3, 3)
    assert summary.final_loss == pytest.approx(2 / 3)
    assert summary.model == "builtin:demo-tiny" and summary.preset_name == "demo"
    line = summary.one_line()
    assert run.name in line and "finished" in line and "step 3/3" in line and "loss 0.6667" in line
    assert "fake trainer started" in run.stdout_log.read_text()


def test_trainer_dying_without_terminal_event_is_recorded_as_failed(fake_trainer):
    run = new_run_dir("crash")
    launch_run("demo", run, command=fake_trainer(run, steps=2, exit_code=3))
    status = final_status(run)
    assert status["status"] == "failed" and status["exit_code"] == 3
    records, _ = read_events(run.events)
    assert records[-1]["type"] == "run_failed"
    assert "exited with code 3" in records[-1]["reason"] and records[-1]["step"] == 2
    assert summarize(run).reason == records[-1]["reason"]


def test_stop_run_sends_sigterm_and_the_trainer_checkpoints(fake_trainer):
    run = new_run_dir("long")
    launch_run("demo", run, command=fake_trainer(run, steps=10_000, delay=0.02))
    wait_for(lambda: summarize(run).step)
    assert summarize(run).status == "running"
    message = stop_run(run, wait=20)
    assert message.startswith(f"Run {run.name} stopped; newest checkpoint: ") and "sftop resume" in message
    status = run.read_status()
    assert status["status"] == "stopped" and status["exit_code"] == 0
    assert run.latest_checkpoint() is not None
    assert not process_alive(status["pid"], status["trainer_start"])
    assert stop_run(run) == f"Run {run.name} is not running (status: stopped)"


def test_supervisor_killed_hard_is_reported_lost(fake_trainer):
    run = new_run_dir("lost")
    launch_run("demo", run, command=fake_trainer(run, steps=10_000, delay=0.02))
    wait_for(lambda: summarize(run).step)
    status = run.read_status()
    # The supervisor first: killed second, it could still see its trainer die and record "failed".
    os.kill(status["supervisor_pid"], 9)
    os.killpg(status["pgid"], 9)
    wait_for(lambda: summarize(run).status == "lost", timeout=10)


def test_list_and_find_runs(fake_trainer):
    with pytest.raises(SftopError, match="no runs yet"):
        find_run()
    a = new_run_dir("alpha", when=1_700_000_000)
    b = new_run_dir("beta", when=1_700_000_100)
    for run in (a, b):
        launch_run("demo", run, command=fake_trainer(run, steps=1, delay=0))
    for run in (a, b):
        final_status(run)
    assert [s.name for s in list_runs()] == [b.name, a.name]
    assert find_run() == b
    assert find_run("alpha") == a
    assert find_run(b.name) == b
    assert find_run(str(a.path)) == a
    with pytest.raises(SftopError, match="No run named"):
        find_run("gamma")
    with pytest.raises(SftopError, match="matches 2 runs"):
        find_run("2023")


def test_preset_object_is_written_resolved(fake_trainer):
    preset, _ = load_preset("demo", ["train.max_steps=7"])
    run = new_run_dir("obj")
    launch_run(preset, run, command=fake_trainer(run, steps=1, delay=0))
    final_status(run)
    text = run.preset.read_text()
    assert "max_steps = 7" in text and "[lora]" in text and "effective_batch = 16" in text


def test_event_follower_replays_then_tails(tmp_path):
    from sftop.engine.events import EventWriter, Message

    path = tmp_path / "events.jsonl"
    follower = EventFollower(path, poll_interval=0.01)
    assert follower.read_new() == []
    with EventWriter(path) as writer:
        writer.write(Message(level="info", text="one"))
        writer.write(Message(level="info", text="two"))
    assert [r["text"] for r in follower.read_new()] == ["one", "two"]
    with open(path, "a") as fh:
        fh.write('{"v": 1, "type": "message", "text": "half')  # being written
    assert follower.read_new() == []
    with open(path, "a") as fh:
        fh.write('"}\n')
    assert [r["text"] for r in follower.read_new()] == ["half"]
    batches = follower.follow()
    assert next(batches) == []


def test_request_checkpoint_writes_control_file(tmp_path):
    run = new_run_dir("ctl")
    path = request_checkpoint(run)
    assert path == run.path / "control" / "checkpoint" and path.exists()


def test_choose_gpu_pins_the_freest_of_several(monkeypatch):
    from sftop.engine import gpu
    from sftop.engine.gpu import GpuInfo, GpuStatus
    from sftop.engine.supervisor import choose_gpu

    gib = 2**30

    def card(i, free):
        return GpuInfo(
            index=i,
            nvml_index=i,
            name="L4",
            uuid=f"GPU-{i}",
            memory_total_bytes=24 * gib,
            memory_used_bytes=(24 - free) * gib,
            memory_free_bytes=free * gib,
        )

    monkeypatch.setattr(gpu, "read_gpus", lambda backend=None: GpuStatus(gpus=[card(0, 2), card(1, 20)]))
    assert choose_gpu({}) == {"CUDA_VISIBLE_DEVICES": "GPU-1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert choose_gpu({"CUDA_VISIBLE_DEVICES": "0"}) == {}  # the user's choice stands
    monkeypatch.setattr(gpu, "read_gpus", lambda backend=None: GpuStatus(gpus=[card(0, 2)]))
    assert choose_gpu({}) == {}


def test_engine_modules_do_not_import_textual():
    import subprocess
    import sys

    code = (
        "import sys, sftop.engine.supervisor, sftop.engine.runs; "
        "print([m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resume_keeps_the_run_and_its_preset(fake_trainer):
    run = new_run_dir("again")
    launch_run("demo", run, command=fake_trainer(run, steps=1, delay=0))
    final_status(run)
    run.preset.write_text(run.preset.read_text() + "# resolved by the trainer\n")
    before = run.preset.read_text()
    launch_run(run.preset, run, resume=True, command=fake_trainer(run, steps=2, delay=0))
    status = wait_for(lambda: (s := run.read_status()).get("resume") and s.get("status") == "finished" and s)
    assert status["resume"] is True and run.preset.read_text() == before  # not rewritten on resume
    assert before.endswith("# resolved by the trainer\n")
    assert [r.name for r in list_runs()] == [run.name]


def _write_events(run, *records):
    from sftop.engine.events import EventWriter

    with EventWriter(run.events) as writer:
        for record in records:
            writer.write(record)


def test_foreground_run_records_itself_running_then_its_outcome(monkeypatch):
    from sftop.engine.events import RunFinished, RunStarted
    from sftop.engine.runs import SUPERVISED_ENV, run_in_foreground

    monkeypatch.delenv(SUPERVISED_ENV, raising=False)
    run = new_run_dir("typed-at-a-shell")
    seen = {}

    def train():
        _write_events(run, RunStarted(run_dir=str(run.path), preset={}, environment={}, total_steps=1))
        seen["status"] = run.read_status()
        seen["listed"] = summarize(run).status
        _write_events(run, RunFinished(step=1, final_loss=0.5, adapter_path=None, runtime_s=0.1))
        return 0

    assert run_in_foreground(run, train) == 0
    assert seen["status"]["status"] == "running" and seen["status"]["foreground"] is True
    assert seen["status"]["pid"] == os.getpid() and seen["listed"] == "running"
    after = run.read_status()
    assert after["status"] == "finished" and after["exit_code"] == 0 and after["ended"] >= after["started"]

    # a crash before any ending record is a failure, and the exception still reaches the caller
    crashed = new_run_dir("crashes")

    def boom():
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError):
        run_in_foreground(crashed, boom)
    assert crashed.read_status()["status"] == "failed"


def test_foreground_run_under_the_supervisor_leaves_status_alone(monkeypatch):
    from sftop.engine.runs import SUPERVISED_ENV, run_in_foreground

    monkeypatch.setenv(SUPERVISED_ENV, "1")
    run = new_run_dir("supervised")
    assert run_in_foreground(run, lambda: 3) == 3
    assert run.read_status() == {}


def test_stop_run_signals_a_foreground_run_alone(tmp_path):
    import subprocess
    import sys

    from sftop.engine.supervisor import process_start_time

    run = new_run_dir("fg-stop")
    # a process that leaves a mark on SIGTERM, in the test's own process group (as a shell job is)
    mark = tmp_path / "got-term"
    code = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(mark)!r}).write_text('1'), sys.exit(0)))\n"
        "print('handler installed', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "handler installed\n"
        run.write_status(
            status="running",
            foreground=True,
            pid=proc.pid,
            pgid=None,
            trainer_start=process_start_time(proc.pid),
            started=time.time(),
        )
        assert "Stopping run" in stop_run(run)
        proc.wait(timeout=10)
        assert mark.read_text() == "1"
    finally:
        proc.kill()


def test_a_resumed_run_is_not_reported_by_its_earlier_ending():
    from sftop.engine.events import RunStarted, RunStopped, Step
    from sftop.engine.supervisor import last_terminal_event

    run = new_run_dir("resumed")
    started = dict(run_dir=str(run.path), preset={}, environment={}, total_steps=4)
    _write_events(run, RunStarted(**started), RunStopped(step=2, signal="SIGTERM", checkpoint=None))
    assert summarize(run).status == "stopped"
    cut = time.time()
    _write_events(
        run,
        RunStarted(**started),
        Step(
            step=3,
            epoch=0.75,
            loss=1.0,
            learning_rate=1e-3,
            grad_norm=1.0,
            tokens_seen=300,
            tokens_per_s=10.0,
            samples_per_s=1.0,
        ),
    )
    run.write_status(status="running", foreground=True, pid=os.getpid(), trainer_start=None, started=cut)
    assert summarize(run).status == "running"
    # the supervisor judging the resumed attempt ignores the earlier ending
    assert last_terminal_event(run, since=cut) is None
    assert last_terminal_event(run)["type"] == "run_stopped"
