"""benchmarks/trace_gaps.py: the GPU's idle gaps in a profiler trace, named by the host's Python frames."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import trace_gaps  # noqa: E402
from dpo_step import trace_for_path  # noqa: E402


def _x(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def _trace(path: Path) -> Path:
    events = [
        _x("kernel", "gemm", 0, 100, tid=7),
        _x("kernel", "gemm", 300, 100, tid=7),
        _x("gpu_memcpy", "Memcpy HtoD", 400, 50, tid=8),
        _x("kernel", "add", 460, 40, tid=7),  # 10 us after the copy: under --min-ms, not a gap
        _x("kernel", "gemm", 600, 100, tid=7),
        _x("gpu_user_annotation", "ProfilerStep#1", 0, 5000, tid=7),  # not device work
        _x("python_function", "site-packages/trl/x.py(10): step", 0, 1000),
        _x("python_function", "/src/sftop/a.py(5): launch", 50, 90),
        _x("python_function", "torch/nn/modules/module.py(1): _call_impl", 150, 140),
        _x("python_function", "/src/sftop/b.py(7): bookkeeping", 151, 138),
        _x("cpu_op", "aten::item", 160, 120),
        _x("python_function", "/src/sftop/b.py(7): bookkeeping", 510, 80),
        _x("cpu_op", "aten::item", 520, 60),
        # another thread, busy at the same instants: not the training loop's
        _x("python_function", "/src/other.py(1): poll", 0, 1000, tid=2),
    ]
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    return path


def test_gaps_are_found_and_summed_by_the_host_frames_running_in_them(tmp_path):
    summary = trace_gaps.explain(_trace(tmp_path / "t.json.gz"), min_ms=0.02, frames=3, top=5)
    assert summary["window_ms"] == 0.7
    assert summary["gaps"] == 2  # 100-300 and 500-600; the 10 us one is under the minimum
    assert summary["idle_ms"] == 0.3
    # the module-call frame is noise; the other thread's frame is not the loop's
    assert summary["by_frames"] == [
        {"frames": "trl/x.py(10): step > /src/sftop/b.py(7): bookkeeping > aten::item", "idle_ms": 0.3, "gaps": 2}
    ]
    assert [g["ms"] for g in summary["largest"]] == [0.2, 0.1]
    assert "0.30 ms     2 gaps  trl/x.py(10): step > /src/sftop/b.py(7): bookkeeping > aten::item" in trace_gaps.report(
        summary
    )


def test_each_path_gets_its_own_trace_file():
    assert trace_for_path("out/dpo.json.gz", "sftop-shared") == "out/dpo.sftop-shared.json.gz"
    assert trace_for_path("out/dpo", "stock") == "out/dpo.stock"


def test_dpo_step_writes_a_trace_with_python_frames(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "dpo_step.py"),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--paths",
            "stock",
            "--seq",
            "32",
            "--answer",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--profile",
            "--trace",
            str(tmp_path / "t" / "dpo.json.gz"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    events = trace_gaps.load_events(tmp_path / "t" / "dpo.stock.json.gz")
    frames = [e["name"] for e in events if e.get("cat") == "python_function"]
    assert any("trl/trainer/dpo_trainer.py" in f for f in frames)
