"""The uninterrupted reference run, trained once per session for the whole fault-injection suite.

Every fault test compares its losses with it at every step: whatever went wrong, a run that
carries on (or resumes) must train exactly what the uninterrupted run trained.
"""

import pytest
from fault_helpers import RUN, STEPS
from train_helpers import events_of, fast_preset, in_home, of_type

from sftop.engine.train.runner import run_training


@pytest.fixture(scope="session")
def reference(sftop_home, tmp_path_factory):
    """The run, uninterrupted: its directory and {step: loss}."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    mp = in_home(sftop_home)
    try:
        assert run_training(fast_preset(*RUN), run_dir) == 0
    finally:
        mp.undo()
    losses = {s["step"]: s["loss"] for s in of_type(events_of(run_dir), "step")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run_dir, losses
