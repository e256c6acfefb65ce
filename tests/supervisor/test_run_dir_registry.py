"""Runs written with `--run-dir` outside the state directory are listed, found and stopped like any."""

from sftop.engine.rundir import RunDir, new_run_dir, register_run_dir
from sftop.engine.runs import find_run, list_runs


def test_a_run_dir_outside_the_state_dir_is_listed_once(tmp_path):
    run = RunDir(tmp_path / "elsewhere" / "my-run").create()
    run.preset.write_text('name = "my-run"\n')
    link = register_run_dir(run)
    assert link is not None and link.resolve() == run.path.resolve()
    assert register_run_dir(run) == link  # a resume does not add a second entry
    listed = [r.path.resolve() for r in list_runs()]
    assert listed == [run.path.resolve()]
    assert find_run("my-run").path.resolve() == run.path.resolve()


def test_a_run_inside_the_state_dir_needs_no_link():
    run = new_run_dir("inside")
    run.preset.write_text('name = "inside"\n')
    assert register_run_dir(run) is None
    assert [r.path for r in list_runs()] == [run.path]


def test_ranks_registering_the_same_run_at_once_share_one_link(tmp_path, monkeypatch):
    """The ranks of a multi-process run register its directory at the same moment: the rank that
    loses the race to create the link takes the winner's, and a name taken by another run is skipped."""
    import time

    base = tmp_path / "runs"
    base.mkdir()
    run = RunDir(tmp_path / "elsewhere" / "shared").create()
    other = RunDir(tmp_path / "elsewhere" / "other").create()
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    (base / "20260101-000000-shared").symlink_to(run.path.resolve(), target_is_directory=True)
    # the other rank's link appeared after this rank looked: as if the directory scan found nothing
    monkeypatch.setattr(type(base), "iterdir", lambda self: iter(()))
    assert register_run_dir(run, base) == base / "20260101-000000-shared"
    assert register_run_dir(other, base) == base / "20260101-000000-other"
    (base / "20260101-000000-third").symlink_to(other.path.resolve(), target_is_directory=True)
    third = RunDir(tmp_path / "elsewhere" / "third").create()
    link = register_run_dir(third, base)
    assert link == base / "20260101-000000-third-2" and link.resolve() == third.path.resolve()
