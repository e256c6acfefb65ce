"""The command line in scripts and over SSH: pipes that close early, no terminal, detached runs,
the runs list and removing runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sftop.engine.presets import load_preset, save_preset
from sftop.engine.rundir import RunDir, new_run_dir
from sftop.engine.run_admin import data_label, run_label
from sftop.engine.supervisor import process_start_time


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "SFTOP_HOME": str(tmp_path), "TERM": "dumb"}


def sftop(*args, env, **kw):
    return subprocess.run(
        [sys.executable, "-m", "sftop", *args], capture_output=True, text=True, env=env, timeout=120, **kw
    )


@pytest.mark.parametrize("args", [["runs"], ["presets", "show", "demo"], ["doctor", "--json"]])
def test_a_reader_that_closes_the_pipe_gets_no_traceback(env, args):
    read, write = os.pipe()
    os.close(read)  # `| head -1` after its first line: every write now fails with EPIPE
    try:
        out = subprocess.run(
            [sys.executable, "-m", "sftop", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        os.close(write)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode == 141


def test_attach_without_a_terminal_refuses_with_a_message(env):
    t0 = time.monotonic()
    out = sftop("attach", env=env, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "needs a terminal" in out.stderr and "ssh -t" in out.stderr
    assert out.stdout == ""  # nothing drawn into the pipe
    assert time.monotonic() - t0 < 60


def test_runs_are_named_after_preset_and_data():
    demo, _ = load_preset("demo")
    assert run_label(demo) == "demo-arithmetic"
    assert data_label("builtin:sample-alpaca") == "sample-alpaca"
    assert data_label("/home/me/data/chats.jsonl") == "chats"
    assert data_label("./saved_dataset/") == "saved_dataset"
    assert data_label("HuggingFaceH4/ultrachat_200k") == "ultrachat_200k"
    named = demo.model_copy(update={"name": "arithmetic-quick"})
    assert run_label(named) == "arithmetic-quick"  # the preset already names its data


def _make_run(env, name: str, status: dict) -> RunDir:
    os.environ["SFTOP_HOME"] = env["SFTOP_HOME"]
    try:
        preset, _ = load_preset("demo", ["data.source=builtin:sample-alpaca"])
        run = new_run_dir(name)
    finally:
        del os.environ["SFTOP_HOME"]
    save_preset(preset, run.preset)
    run.status_file.write_text(json.dumps(status))
    return run


def test_runs_lists_a_header_model_and_data_and_rm_refuses_a_live_run(env):
    done = _make_run(env, "done", {"status": "finished", "started": time.time() - 60})
    me = os.getpid()
    live = _make_run(
        env,
        "live",
        {"status": "running", "supervisor_pid": me, "supervisor_start": process_start_time(me), "started": time.time()},
    )
    out = sftop("runs", env=env)
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["RUN", "STATUS", "STEP", "LOSS", "STARTED", "MODEL", "DATA"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {done.name, live.name}
    assert "builtin:demo-tiny" in rows[done.name] and rows[done.name].rstrip().endswith("sample-alpaca")

    out = sftop("runs", "rm", live.name, env=env)
    assert out.returncode != 0 and "sftop stop" in out.stderr and "Traceback" not in out.stderr
    assert live.path.is_dir()

    out = sftop("runs", "rm", done.name, env=env)
    assert out.returncode == 0, out.stderr
    assert not done.path.exists() and live.path.is_dir()


@pytest.mark.slow
def test_run_detach_returns_at_once_and_the_run_finishes_in_the_background(env):
    t0 = time.monotonic()
    out = sftop("run", "demo", "--detach", "--set", "train.max_steps=1", "--set", "data.max_rows=32", env=env)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 30  # no training in the foreground
    first = out.stdout.splitlines()[0]
    assert first.startswith("sftop: started ") and "-demo-arithmetic" in first
    assert "sftop attach " in out.stdout
    name = first.split()[2]
    events = next((__import__("pathlib").Path(env["SFTOP_HOME"])).rglob(f"{name}/events.jsonl"), None)
    deadline = time.monotonic() + 240
    kinds = []
    while time.monotonic() < deadline:
        if events is None:
            events = next((__import__("pathlib").Path(env["SFTOP_HOME"])).rglob(f"{name}/events.jsonl"), None)
        elif events.exists():
            kinds = [json.loads(line)["type"] for line in events.read_text().splitlines() if line.strip()]
            if kinds and kinds[-1] in ("run_finished", "run_failed", "run_stopped"):
                break
        time.sleep(0.5)
    assert kinds and kinds[-1] == "run_finished", kinds


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.source=builtin:sample-broken", "data.max_bad_fraction=0.0"], "unusable"),
        (["data.source=/nonexistent/rows.jsonl"], "does not exist"),
    ],
)
def test_a_run_with_bad_data_fails_before_it_has_a_run_directory(env, overrides, expected):
    from pathlib import Path

    args = [a for o in overrides for a in ("--set", o)]
    for extra in ([], ["--detach"]):
        out = sftop("run", "demo", *args, *extra, env=env)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert expected in out.stderr, out.stderr
        assert not list(Path(env["SFTOP_HOME"]).rglob("preset.toml")), "a failed pre-check left a run directory"
