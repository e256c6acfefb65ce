"""`sftop doctor` on a machine without a GPU: findings with hints, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_doctor_without_gpu_reports_reason_and_hint(tmp_path):
    env = {**os.environ, "SFTOP_HOME": str(tmp_path), "TERM": "dumb"}
    out = subprocess.run(
        [sys.executable, "-m", "sftop", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["python"]["status"] == "ok"
    assert checks["torch"]["status"] == "ok"
    assert checks["gpus"]["status"] == "warn"
    assert "driver" in checks["gpus"]["hint"].lower() or "no gpu" in checks["gpus"]["hint"].lower()
    assert checks["terminal"]["status"] == "warn" and "256" in checks["terminal"]["hint"]
    assert str(tmp_path) in checks["disk"]["found"]


def test_doctor_text_report_says_what_to_do(tmp_path):
    env = {**os.environ, "SFTOP_HOME": str(tmp_path), "TERM": "xterm-256color"}
    out = subprocess.run(
        [sys.executable, "-m", "sftop", "doctor"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0
    assert "hint:" in out.stdout
    assert "sftop can train here." in out.stdout
    assert "colours: 256" in out.stdout
