"""Training processes run with expandable segments unless the user chose allocator settings."""

import sys
import time

import pytest

from sftop.engine.allocator import SETTING, allocator_env, allocator_settings, configure_allocator
from sftop.engine.rundir import new_run_dir
from sftop.engine.supervisor import launch_run


def test_allocator_env_adds_expandable_segments_only_where_the_user_set_nothing():
    assert allocator_env({}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert allocator_env({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}) == {}
    assert allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {}
    # an empty variable is no choice
    assert allocator_env({"PYTORCH_ALLOC_CONF": ""}) == {"PYTORCH_CUDA_ALLOC_CONF": SETTING}


def test_configure_allocator_keeps_the_users_settings_and_reports_them():
    env: dict[str, str] = {}
    configure_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": SETTING}
    assert allocator_settings(env) == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    mine = {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6"}
    configure_allocator(mine)
    assert mine == {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6"}
    assert allocator_settings(mine) == "PYTORCH_ALLOC_CONF=garbage_collection_threshold:0.6"
    assert allocator_settings({}) == "torch defaults"


def _child_env(monkeypatch, tmp_path, **user):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    seen = tmp_path / "seen.txt"
    code = (
        "import os, sys; open(sys.argv[1], 'w').write("
        "os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '-') + '|' + os.environ.get('PYTORCH_ALLOC_CONF', '-'))"
    )
    run = new_run_dir("demo")
    launch_run("demo", run, command=[sys.executable, "-c", code, str(seen)])
    deadline = time.monotonic() + 20
    while not (seen.exists() and seen.read_text()):
        assert time.monotonic() < deadline, "the detached trainer never started"
        time.sleep(0.05)
    return seen.read_text()


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({}, "expandable_segments:True|-"),
        ({"PYTORCH_ALLOC_CONF": "backend:native"}, "-|backend:native"),
    ],
)
def test_the_detached_trainer_starts_with_the_allocator_settings(monkeypatch, tmp_path, user, expected):
    assert _child_env(monkeypatch, tmp_path, **user) == expected
