import sys
from pathlib import Path

import pytest

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")


@pytest.fixture(autouse=True)
def sftop_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_trainer():
    def command(run_dir, steps=3, delay=0.05, exit_code=None):
        cmd = [sys.executable, str(FAKE_TRAINER), str(run_dir.path), str(steps), str(delay)]
        return cmd + ([str(exit_code)] if exit_code is not None else [])

    return command
