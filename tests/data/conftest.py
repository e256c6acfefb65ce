"""Fixtures for the data tests. The tokenizers live in data_tokenizers.py: a module named
`conftest` cannot be imported by tests when several test folders each have one."""

from __future__ import annotations

import pytest

from data_tokenizers import CHATML, END_OF_TURN, SPECIALS, TEMPLATES, make_tokenizer  # noqa: F401


@pytest.fixture(
    params=[("char", "chatml"), ("char", "llama3"), ("bpe", "chatml"), ("bpe", "llama3")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def any_tokenizer(request):
    tok = make_tokenizer(*request.param)
    tok.test_template = request.param[1]
    return tok


@pytest.fixture
def chatml_tokenizer():
    return make_tokenizer("char", "chatml")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "sftop-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
