"""Damaged checkpoints: every file of a checkpoint, cut short, flipped or deleted, is caught by its
manifest before anything is loaded, and the resume falls back to the next complete checkpoint and
trains exactly what the uninterrupted run trained."""

import json
import pickle
import shutil

import pytest
from fault_helpers import RUN, STEPS, assert_same_losses, killed_copy
from train_helpers import events_of, fast_preset, of_type

from sftop.engine.rundir import RunDir
from sftop.engine.train.manifest import MANIFEST, write_manifest
from sftop.engine.train.runner import pick_checkpoint, run_training
from sftop.engine.train.trainer import checkpoint_problem
from sftop.tui.run_state import RunState


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _delete(path):
    path.unlink()


CORRUPTIONS = {"truncated": _truncate, "one bit flipped": _flip, "deleted": _delete}


@pytest.fixture(scope="module")
def checkpoint_files(reference):
    run_dir, _ = reference
    newest = run_dir / "checkpoints" / f"checkpoint-{STEPS}"
    return sorted(p.name for p in newest.iterdir())


def test_every_checkpoint_has_a_manifest_listing_sizes_and_checksums(reference, checkpoint_files):
    run_dir, _ = reference
    for ckpt in RunDir(run_dir).complete_checkpoints():
        manifest = json.loads((ckpt / MANIFEST).read_text())
        listed = manifest["files"]
        assert set(listed) == {p.name for p in ckpt.iterdir()} - {MANIFEST}
        for name, entry in listed.items():
            assert entry["size"] == (ckpt / name).stat().st_size
            assert len(entry["sha256"]) == 64
        assert checkpoint_problem(ckpt) is None
    assert MANIFEST in checkpoint_files and "optimizer.pt" in checkpoint_files


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_each_corruption_of_each_checkpoint_file_falls_back(reference, checkpoint_files, tmp_path, how):
    run_dir, _ = reference
    checked = []
    for name in checkpoint_files:
        dest = tmp_path / name / "run"
        (dest / "checkpoints").mkdir(parents=True)
        for step in (4, 6):
            shutil.copytree(run_dir / "checkpoints" / f"checkpoint-{step}", dest / "checkpoints" / f"checkpoint-{step}")
        damaged = dest / "checkpoints" / "checkpoint-6"
        CORRUPTIONS[how](damaged / name)
        problem = checkpoint_problem(damaged)
        assert problem is not None, f"{name} {how} was not noticed"
        with open(dest / "events.jsonl", "w"):
            pass
        from sftop.engine.events import EventWriter

        with EventWriter(dest / "events.jsonl") as writer:
            assert pick_checkpoint(RunDir(dest), writer) == dest / "checkpoints" / "checkpoint-4"
        warning = of_type(events_of(dest), "message")[0]["text"]
        assert "checkpoint-6" in warning and "falling back" in warning
        checked.append(name)
    assert len(checked) == len(checkpoint_files)


def test_corrupted_newest_checkpoint_resumes_from_the_next_one_exactly(home, reference, tmp_path):
    """kill -9 after step 5, and the newest checkpoint (step 4) was damaged on disk afterwards."""
    ref_dir, losses = reference
    run_dir = killed_copy(ref_dir, tmp_path / "run", after_step=5)
    _truncate(run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt")
    before = events_of(run_dir)[-1]["time"]

    assert run_training(fast_preset(*RUN), run_dir, resume=True) == 0

    records = [r for r in events_of(run_dir) if r["time"] > before]
    resumed = of_type(records, "resumed")
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["checkpoint"].endswith("checkpoint-2")
    assert any("checkpoint-4" in m["text"] and "optimizer.pt" in m["text"] for m in of_type(records, "message"))
    assert assert_same_losses(run_dir, losses, since=before) == list(range(3, STEPS + 1))
    assert records[-1]["type"] == "run_finished" and records[-1]["step"] == STEPS

    # The dashboard drops the dead attempt's steps 3-5 at `resumed`: its curve never doubles back.
    state = RunState()
    state.apply(events_of(run_dir))
    assert state.loss.xs == list(range(1, STEPS + 1))
    assert state.loss.ys == pytest.approx([losses[s] for s in range(1, STEPS + 1)], rel=1e-4, abs=1e-5)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_a_traceback_and_the_resume_falls_back(home, reference, tmp_path):
    """A checkpoint whose pickle runs code (its manifest rewritten to match): the restricted loader
    refuses it, the run says so in one line and resumes from the previous checkpoint."""
    ref_dir, losses = reference
    run_dir = killed_copy(ref_dir, tmp_path / "run", after_step=5)
    bad = run_dir / "checkpoints" / "checkpoint-4"
    (bad / "rng_state.pth").write_bytes(pickle.dumps(_Exploit()))
    write_manifest(bad)
    before = events_of(run_dir)[-1]["time"]

    assert run_training(fast_preset(*RUN), run_dir, resume=True) == 0

    assert not (tmp_path / "PWNED").exists() and not (run_dir / "PWNED").exists()
    records = [r for r in events_of(run_dir) if r["time"] > before]
    assert [r["step"] for r in of_type(records, "resumed")] == [4, 2]
    warning = [m["text"] for m in of_type(records, "message") if "could not be loaded" in m["text"]]
    assert warning and "checkpoint-4" in warning[0] and "falling back to checkpoint-2" in warning[0]
    assert assert_same_losses(run_dir, losses, since=before)[-4:] == list(range(3, STEPS + 1))
    assert records[-1]["type"] == "run_finished"
    assert "Traceback" not in (run_dir / "stdout.log").read_text().split("could not be loaded")[-1]


def test_no_loadable_checkpoint_is_one_paragraph_and_a_non_zero_exit(home, reference, tmp_path, capsys):
    ref_dir, _ = reference
    run_dir = killed_copy(ref_dir, tmp_path / "run", after_step=3)
    bad = run_dir / "checkpoints" / "checkpoint-2"
    (bad / "rng_state.pth").write_bytes(pickle.dumps(_Exploit()))
    write_manifest(bad)
    from sftop.cli import main

    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("sftop: error:")]
    assert len(error) == 1
    assert "checkpoint-2 could not be loaded" in error[0] and "Move " in error[0]
    last = events_of(run_dir)[-1]
    assert last["type"] == "run_failed" and "could not be loaded" in last["reason"]
