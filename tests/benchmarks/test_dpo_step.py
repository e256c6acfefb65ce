"""benchmarks/dpo_step.py: Unsloth's DPO path is optional, and says so plainly where it cannot run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "benchmarks" / "dpo_step.py"


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="Unsloth is installed here")
def test_unsloth_path_reports_why_it_did_not_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [sys.executable, str(SCRIPT), "--one", "unsloth", "--model", "tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    result = json.loads(next(ln for ln in one.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])
    assert result == {"path": "unsloth", "unavailable": "ModuleNotFoundError: No module named 'unsloth'"}
    # the whole command names the path it skipped, why, and what to do
    out = tmp_path / "dpo.json"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--paths",
            "unsloth",
            "--seq",
            "32",
            "--answer",
            "8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "unsloth not measured: Unsloth cannot be imported here (ModuleNotFoundError" in run.stdout
    assert "--peer-pythonpath" in run.stdout
    assert json.loads(out.read_text())["results"][0]["unavailable"].startswith("ModuleNotFoundError")


def test_unknown_paths_are_refused():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--paths", "stock,liger"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "unknown path(s) liger" in proc.stderr
