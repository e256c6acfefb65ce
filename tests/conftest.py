import os

import pytest

# Triton chooses between its compiler and its CPU interpreter when a kernel is decorated, so the
# choice must be made before any test module imports a kernel. Without a CUDA GPU (CI), the
# interpreter is the only way the kernels run at all.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # noqa: BLE001 - a broken CUDA setup: test as on a CPU
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The training and reliability suites share these: the demo model is built once per session.
@pytest.fixture(scope="session")
def sftop_home(tmp_path_factory):
    """One SFTOP_HOME for the session so the demo model is built once (it is cached there).

    The environment is only changed inside fixtures (`home`, or MonkeyPatch contexts in module
    fixtures), never for the rest of the test session.
    """
    home = tmp_path_factory.mktemp("sftop-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTOP_HOME", str(home))
        from sftop.engine.models.demo import ensure_demo_model

        ensure_demo_model()
    return home


@pytest.fixture
def home(sftop_home, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(sftop_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # these tests never touch the hub
    return sftop_home


@pytest.fixture
def gate_up_chunks(monkeypatch):
    """How often the chunked LoRA MLP (SFTOP_CHUNKED_MLP) computes a token chunk's gate and up, by
    where: a checkpoint's recomputation, or the first run and backward."""
    import sftop.kernels.lora_mlp as lm
    from sftop.kernels import recompute

    counts = {"first run or backward": 0, "recomputation": 0}
    real = lm._gate_up_chunk

    def counted(*args):
        counts["recomputation" if recompute.recomputing() else "first run or backward"] += 1
        return real(*args)

    monkeypatch.setattr(lm, "_gate_up_chunk", counted)
    return counts
