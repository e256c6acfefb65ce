"""The command line: exit codes and one-paragraph errors, never a traceback for user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def sftop(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sftop", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def env(tmp_path, monkeypatch):
    import os

    e = dict(os.environ)
    e["SFTOP_HOME"] = str(tmp_path)
    return e


def test_presets_list_and_show(env):
    out = sftop("presets", "list", env=env)
    assert out.returncode == 0
    assert "demo" in out.stdout and "built-in" in out.stdout
    out = sftop("presets", "show", "demo", "--set", "train.max_steps=9", env=env)
    assert out.returncode == 0
    assert "max_steps = 9" in out.stdout


def test_user_error_is_one_paragraph_without_traceback(env):
    out = sftop("presets", "show", "demo", "--set", "train.learnig_rate=1", env=env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "did you mean `train.learning_rate`" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_preset_on_run(env):
    out = sftop("run", "no-such-preset", env=env)
    assert out.returncode == 2
    assert "No preset named `no-such-preset`" in out.stderr
    assert "Traceback" not in out.stderr


def test_data_check_fails_when_a_run_would_stop(env):
    out = sftop(
        "data",
        "check",
        "demo",
        "--set",
        "data.source=builtin:sample-broken",
        "--set",
        "data.max_bad_fraction=0.1",
        env=env,
    )
    assert out.returncode == 1
    assert "row 11: bad role order" in out.stdout
    assert "a run would stop before training" in out.stdout
    ok = sftop(
        "data",
        "check",
        "demo",
        "--set",
        "data.source=builtin:sample-broken",
        "--set",
        "data.max_bad_fraction=0.5",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
