import pytest


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
