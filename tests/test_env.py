"""The SFTOP_* switches: one parser, and docs/configuration.md lists every variable the code reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sftop.kernels.env import env_choice, env_flag

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "Yes", " on "])
def test_on_words(value):
    assert env_choice("SFTOP_X", {"SFTOP_X": value}) is True
    assert env_flag("SFTOP_X", False, {"SFTOP_X": value}) is True


@pytest.mark.parametrize("value", ["0", "false", "False", "off", "NO"])
def test_off_words(value):
    assert env_choice("SFTOP_X", {"SFTOP_X": value}) is False
    assert env_flag("SFTOP_X", True, {"SFTOP_X": value}) is False


@pytest.mark.parametrize("env", [{}, {"SFTOP_X": ""}, {"SFTOP_X": "  "}])
def test_unset_or_empty_is_the_default(env):
    assert env_choice("SFTOP_X", env) is None
    assert env_flag("SFTOP_X", True, env) is True and env_flag("SFTOP_X", False, env) is False


def test_anything_else_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match=r"SFTOP_CUDA_GRAPHS='flase' is not a switch value.*0, false, off, no"):
        env_choice("SFTOP_CUDA_GRAPHS", {"SFTOP_CUDA_GRAPHS": "flase"})


def test_every_switch_reads_false_as_off(monkeypatch):
    from sftop.kernels import cuda_graphs
    from sftop.kernels.constants import projections_worth_keeping

    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "false")
    assert not cuda_graphs.enabled_by_env()
    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "off")
    assert not cuda_graphs.enabled_by_env()
    monkeypatch.delenv("SFTOP_CUDA_GRAPHS")
    assert cuda_graphs.enabled_by_env()
    monkeypatch.setenv("SFTOP_KEEP_PROJECTIONS", "false")
    assert not projections_worth_keeping(4096, 14336, 4096, 1024)  # wide enough to keep by default
    monkeypatch.setenv("SFTOP_KEEP_PROJECTIONS", "true")
    assert projections_worth_keeping(2048, 8192, 2048, 512)  # too narrow by default


def test_the_configuration_doc_lists_every_variable_the_code_reads():
    used = set()
    for path in (ROOT / "sftop").rglob("*.py"):
        used |= set(re.findall(r"\bSFTOP_[A-Z_]+\b", path.read_text(encoding="utf-8")))
    documented = set()
    # training's variables in the configuration reference; the benchmarks' own (profiling) with them
    for doc in ("configuration.md", "benchmarks.md"):
        text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
        documented |= set(re.findall(r"^\| `(SFTOP_[A-Z_]+)` \|", text, re.MULTILINE))
    assert used == documented
