"""benchmarks/whole_run.py --profile: where the profiled window sits in a run, and how its summary is
set against the run's unprofiled steps."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import whole_run  # noqa: E402

from sftop.engine.events import EventWriter  # noqa: E402
from sftop.engine.train.profiling import SUMMARY  # noqa: E402


def test_the_window_sits_in_the_middle_past_the_first_steps():
    assert whole_run.profile_window(38) == (17, 4)  # 300 rows at 8 per step
    assert whole_run.profile_window(250) == (123, 4)
    assert whole_run.profile_window(6) == (3, 1)
    assert whole_run.profile_window(1) == (1, 1)
    for steps in range(1, 60):
        first, count = whole_run.profile_window(steps)
        assert 1 <= first and first + count - 1 <= steps


def test_the_summary_is_set_against_unprofiled_steps(tmp_path):
    run_dir, profile_dir = tmp_path / "run", tmp_path / "profile"
    profile_dir.mkdir()
    writer = EventWriter(run_dir / "events.jsonl")
    # ten steps of 1,000 tokens; 0.1 s each, but the profiled steps 5-6 took 0.5 s
    t = 0.0
    for step in range(1, 11):
        t += 0.5 if step in (5, 6) else 0.1
        writer.write({"type": "step", "step": step, "tokens_seen": 1000 * step, "time": t})
    writer.close()
    (profile_dir / SUMMARY).write_text(
        json.dumps(
            {
                "steps": [5, 6],
                "wall_ms_per_step": 500.0,
                "gpu_busy_ms_per_step": 80.0,
                "gpu_busy_share": 0.16,
                "host_syncs_per_step": 2.0,
                "host_syncs_by_cause": {"cudaStreamSynchronize in aten::item": 2.0},
                "top_host_ops": [["aten::mm", 3.5, 110.0]],
                "trace": "trace.json.gz",
            }
        )
    )
    summary = whole_run.read_profile(profile_dir, run_dir)
    assert summary["gpu_ms_per_1k_tokens"] == 80.0
    assert summary["unprofiled_wall_ms_per_1k_tokens"] == 100.0  # steps 3-4 and 7-10
    assert summary["gpu_busy_share_unprofiled"] == 0.8
    text = "\n".join(whole_run.profile_lines("sftop", summary))
    assert "GPU busy 80.0 ms of a 500.0 ms profiled step (16%)" in text
    assert "against the unprofiled steps 80%" in text
    assert "host syncs per step: 2 (cudaStreamSynchronize in aten::item x2)" in text
    assert "aten::mm 3.50 ms x110" in text
    missing = whole_run.read_profile(tmp_path / "nowhere", run_dir)
    assert "missing" in missing and "sftop profile: no " in whole_run.profile_lines("sftop", missing)[0]


def test_a_trace_with_stacks_says_where_the_gpu_waited(tmp_path):
    import gzip

    run_dir, profile_dir = tmp_path / "run", tmp_path / "profile"
    profile_dir.mkdir()
    writer = EventWriter(run_dir / "events.jsonl")
    for step in range(1, 5):
        writer.write({"type": "step", "step": step, "tokens_seen": 1000 * step, "time": 0.1 * step})
    writer.close()
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 100, "pid": 1, "tid": 7},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1100, "dur": 100, "pid": 1, "tid": 7},
        {
            "ph": "X",
            "cat": "python_function",
            "name": "transformers/trainer.py(1): training_step",
            "ts": 0,
            "dur": 1200,
            "pid": 1,
            "tid": 1,
        },
        {
            "ph": "X",
            "cat": "python_function",
            "name": "torch/nn/modules/module.py(2): train",
            "ts": 150,
            "dur": 900,
            "pid": 1,
            "tid": 1,
        },
    ]
    (profile_dir / "trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    summary = {
        "steps": [2, 3],
        "wall_ms_per_step": 2.0,
        "gpu_busy_ms_per_step": 0.1,
        "gpu_busy_share": 0.05,
        "host_syncs_per_step": 0.0,
        "host_syncs_by_cause": {},
        "top_host_ops": [],
        "trace": "trace.json.gz",
        "stacks": True,
    }
    (profile_dir / SUMMARY).write_text(json.dumps(summary))
    read = whole_run.read_profile(profile_dir, run_dir)
    assert read["idle_gaps"]["idle_ms"] == 1.0 and read["idle_gaps"]["gaps"] == 1
    text = "\n".join(whole_run.profile_lines("sftop", read))
    assert "1.0 ms in 1 gaps: transformers/trainer.py(1): training_step > torch/nn/modules/module.py(2): train" in text
    # without stacks the trace is not read for gaps
    (profile_dir / SUMMARY).write_text(json.dumps({**summary, "stacks": False}))
    assert "idle_gaps" not in whole_run.read_profile(profile_dir, run_dir)


def test_the_row_says_what_its_graph_captures_cost(tmp_path):
    graphs = {
        "captures": 8,
        "replays": 110,
        "eager_calls": 7,
        "failures": [],
        "capture_s": 8.5,
        "capture_s_by_phase": {"warm_up": 2.0, "clean_up": 0.5, "forward": 2.5, "backward": 3.5},
    }
    with EventWriter(tmp_path / "events.jsonl") as writer:
        writer.write({"type": "run_started", "plan": {"micro_batch": 8, "grad_accum": 1}})
        writer.write({"type": "step", "step": 1, "loss": 1.0, "tokens_per_s": 100.0})
        writer.write({"type": "run_finished", "step": 1, "runtime_s": 20.0, "graphs": graphs})
    row = whole_run.read_sftop_events(tmp_path)
    assert row["graphs"] == graphs
    row["train_s"] = 17.0
    assert whole_run.graphs_line("sftop", row) == (
        "sftop CUDA graphs: 8 captured in 8.50 s (50% of the train time) (warm_up 2.00 s, clean_up 0.50 s, "
        "forward 2.50 s, backward 3.50 s); 110 replays, 7 eager calls."
    )
    assert whole_run.graphs_line("sftop", {}) is None  # an eager run, or one from before the summary
