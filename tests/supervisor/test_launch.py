"""The multi-process launch: what the supervisor writes and runs, and how it names a failed rank."""

from __future__ import annotations

import sys

from sftop.engine.events import EventWriter, RunFailed, read_events
from sftop.engine.launch import (
    failure_reason,
    launcher_failures,
    prepare_launch,
    rank_events_path,
    signal_ranks,
    stop_file,
)
from sftop.engine.presets import load_preset, save_preset
from sftop.engine.rundir import new_run_dir
from sftop.engine.supervisor import supervise, trainer_command

SUMMARY = """
Failures:
[1]:
  time      : 2026-12-06_11:27:31
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 100)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_11:27:31
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 101)  (SIGKILL)
  error_file: <N/A>
"""


def _run(overrides):
    run = new_run_dir("multi")
    preset, _ = load_preset("demo", overrides)
    save_preset(preset, run.preset)
    return run


def test_one_process_is_launched_as_before():
    run = _run([])
    assert prepare_launch(run, trainer_command(run)) is None


def test_cpu_processes_get_accelerate_launch_with_config_and_a_script():
    run = _run(["plan.gpus=2", 'plan.device="cpu"'])
    launch = prepare_launch(run, trainer_command(run, resume=True))
    assert launch is not None and launch.world_size == 2
    assert launch.command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert launch.command[-7:] == ["-m", "sftop", "run", str(run.preset), "--run-dir", str(run.path), "--resume"]
    assert "--num_processes" in launch.command and launch.command[launch.command.index("--num_processes") + 1] == "2"
    config = (run.path / "accelerate.yaml").read_text()
    assert 'distributed_type: "MULTI_GPU"' in config and "use_cpu: true" in config and "main_process_port: 0" in config
    assert launch.env["ACCELERATE_USE_CPU"] == "true" and launch.env["CUDA_VISIBLE_DEVICES"] == ""
    assert launch.env["SFTOP_CUDA_GRAPHS"] == "0" and launch.env["SFTOP_DISTRIBUTED"] == "cpu"
    script = (run.path / "launch.sh").read_text()
    assert "export ACCELERATE_USE_CPU=true" in script and "--config_file" in script


def test_an_impossible_plan_gpus_fails_the_run_with_the_reason(monkeypatch):
    monkeypatch.setattr(
        "sftop.engine.gpu_select.read_gpus",
        lambda: __import__("sftop.engine.gpu", fromlist=["GpuStatus"]).GpuStatus(reason="no driver"),
    )
    run = _run(["plan.gpus=2"])
    monkeypatch.setattr("signal.signal", lambda *a: None)  # supervise installs handlers meant for its own process
    assert supervise(run) != 0
    records, _ = read_events(run.events)
    assert records[-1]["type"] == "run_failed" and "plan.gpus = 2 asks for GPUs" in records[-1]["reason"]
    assert run.read_status()["status"] == "failed"


def test_launcher_summary_is_read_root_cause_first():
    assert launcher_failures(SUMMARY) == [(1, -9), (0, 1)]


def test_failure_names_the_rank_that_failed_first_not_the_peer_that_lost_it():
    run = _run(["plan.gpus=2", 'plan.device="cpu"'])
    launch = prepare_launch(run, trainer_command(run))
    assert launch is not None
    # rank 0 fails later, only because rank 1 went away; rank 1's own error is the cause
    with EventWriter(rank_events_path(run, 1)) as w:
        w.write(RunFailed(step=3, reason="internal error (ValueError: bad row 17)"))
    with EventWriter(rank_events_path(run, 0)) as w:
        w.write(RunFailed(step=3, reason="internal error (RuntimeError: Connection closed by peer [127.0.0.1]:1)"))
    with open(run.stdout_log, "a") as fh:
        fh.write(SUMMARY.replace("-9 (pid: 101)  (SIGKILL)", "1 (pid: 101)"))
    assert failure_reason(run, launch, 1) == "rank 1 of 2 failed: internal error (ValueError: bad row 17)"
    # a rank killed without a word is named with its signal
    rank_events_path(run, 1).unlink()
    with open(run.stdout_log, "a") as fh:
        fh.write(SUMMARY)
    assert failure_reason(run, launch, 1).startswith("rank 1 of 2 was killed by signal SIGKILL")


def test_stop_reaches_every_rank_through_a_file_and_their_pids(tmp_path):
    import subprocess

    run = _run(["plan.gpus=2", 'plan.device="cpu"'])
    assert prepare_launch(run, trainer_command(run)) is not None
    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\nprint('ok', flush=True)\ntime.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for rank, proc in enumerate(procs):
        assert proc.stdout.readline().strip() == "ok"
        (run.path / "ranks" / f"rank-{rank}.pid").write_text(f"{proc.pid}\n")
    import signal

    assert signal_ranks(run, signal.SIGTERM) == [0, 1]
    assert [p.wait(timeout=20) for p in procs] == [7, 7]
    assert stop_file(run).read_text().strip() == "SIGTERM"


def _two_gpus(monkeypatch, used=(0.5, 0.5)):
    from sftop.engine.gpu import GpuInfo, GpuStatus

    gib = 2**30
    cards = [
        GpuInfo(
            index=i,
            nvml_index=i,
            name="H100",
            uuid=f"GPU-{i}",
            memory_total_bytes=80 * gib,
            memory_used_bytes=int(u * gib),
            memory_free_bytes=int((80 - u) * gib),
        )
        for i, u in enumerate(used)
    ]
    monkeypatch.setattr("sftop.engine.gpu_select.read_gpus", lambda: GpuStatus(gpus=cards))


def test_one_named_gpu_pins_the_trainer_to_it(monkeypatch):
    _two_gpus(monkeypatch)
    run = _run(["plan.gpus=[1]"])
    command = trainer_command(run)
    launch = prepare_launch(run, command)
    assert launch is not None and launch.world_size == 1 and launch.command == command
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "GPU-1" and launch.env["SFTOP_GPU_PINNED"] == "1"


def test_two_gpus_get_nccl_ranks_on_exactly_those_gpus(monkeypatch):
    _two_gpus(monkeypatch, used=(0.5, 0.4))
    run = _run(["plan.gpus=2", "train.effective_batch=8"])
    launch = prepare_launch(run, trainer_command(run))
    assert launch is not None and launch.world_size == 2 and launch.selection.backend == "nccl"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "GPU-0,GPU-1" and "ACCELERATE_USE_CPU" not in launch.env
    assert "use_cpu: false" in (run.path / "accelerate.yaml").read_text()


def test_the_strategy_is_decided_at_launch_and_written_into_the_accelerate_config():
    from sftop.engine.gpu import GIB, GpuInfo, GpuStatus
    from sftop.engine.gpu_select import select_gpus
    from sftop.engine.launch import _dump_yaml, accelerate_config, launch_strategy

    def cards(gib: int) -> GpuStatus:
        return GpuStatus(
            gpus=[
                GpuInfo(
                    index=i,
                    nvml_index=i,
                    name=f"Test {gib}GB",
                    uuid=f"GPU-{i}",
                    memory_total_bytes=gib * GIB,
                    memory_used_bytes=0,
                    memory_free_bytes=gib * GIB,
                )
                for i in range(2)
            ]
        )

    big, _ = load_preset(
        "demo", ['model.name="meta-llama/Llama-3.1-8B"', "train.effective_batch=8", "data.max_length=512"]
    )
    small_gpus = select_gpus(big.plan, cards(16))
    strategy, fsdp = launch_strategy(big, small_gpus)
    # an 8B in bf16 does not fit a 16 GB card: FSDP2 with one unit per Llama decoder layer
    assert strategy == "fsdp2" and fsdp is not None
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    config = _dump_yaml(accelerate_config(small_gpus, fsdp=fsdp))
    assert 'distributed_type: "FSDP"' in config and "fsdp_config:\n  fsdp_version: 2\n" in config
    assert "use_cpu: false" in config
    large_gpus = select_gpus(big.plan, cards(80))
    assert launch_strategy(big, large_gpus) == ("ddp", None)
    forced = big.model_copy(update={"plan": big.plan.model_copy(update={"strategy": "fsdp2"})})
    assert launch_strategy(forced, large_gpus)[0] == "fsdp2"
