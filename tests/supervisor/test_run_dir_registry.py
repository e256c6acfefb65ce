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
