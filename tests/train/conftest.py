import os

import pytest


@pytest.fixture(scope="session")
def sftop_home(tmp_path_factory):
    """One SFTOP_HOME for the session so the demo model is built once (it is cached there)."""
    home = tmp_path_factory.mktemp("sftop-home")
    old = os.environ.get("SFTOP_HOME")
    os.environ["SFTOP_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # these tests never touch the hub
    from sftop.engine.models.demo import ensure_demo_model

    ensure_demo_model()
    yield home
    if old is None:
        os.environ.pop("SFTOP_HOME", None)
    else:
        os.environ["SFTOP_HOME"] = old


@pytest.fixture
def home(sftop_home, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(sftop_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return sftop_home
