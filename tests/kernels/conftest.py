import os

import pytest
import torch

if not torch.cuda.is_available():
    # tests/conftest.py does this too; repeated so `pytest tests/kernels/...` alone is safe
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _kernel_testutil import CASE_IDS, CASES


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


@pytest.fixture
def poison(monkeypatch):
    """Make every float torch.empty/empty_like in the kernels return NaN-filled memory.

    The kernels allocate their outputs with these; an element a kernel forgets to write stays NaN
    and fails rel_err instead of silently holding stale zeros.
    """
    orig_empty, orig_empty_like = torch.empty, torch.empty_like

    def _poisoned(t):
        if t.is_floating_point() and not t.requires_grad:  # torch.utils.checkpoint makes a leaf
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(orig_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(orig_empty_like(*a, **k)))
    yield
