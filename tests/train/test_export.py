"""Export: the adapter alone, or merged into the base model with identical outputs."""

import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftop.engine.errors import SftopError
from sftop.engine.export import export_run
from sftop.engine.models.demo import demo_dir
from sftop.engine.rundir import RunDir
from sftop.engine.train.runner import run_training
from train_helpers import fast_preset, in_home


@pytest.fixture(scope="module")
def trained(sftop_home, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export-run")
    mp = in_home(sftop_home)
    try:
        preset = fast_preset("train.max_steps=3", "train.save_steps=2", "train.learning_rate=1e-2")
        assert run_training(preset, run_dir) == 0
    finally:
        mp.undo()
    return run_dir


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_matches_base_plus_adapter(trained, tmp_path, home):
    out = export_run(RunDir(trained), merged=True, out=tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(demo_dir()).eval()
    ids = AutoTokenizer.from_pretrained(out)("What is 2+3?", return_tensors="pt")["input_ids"]
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, trained / "adapter").eval()
    expected = _logits(with_adapter, ids)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter learned something
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)


def test_adapter_export_copies_only_the_adapter(trained, tmp_path, home):
    out = export_run(trained, merged=False, out=tmp_path / "a")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".pt", ".pth", ".bin")) for n in names)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_dir()), out)


def test_export_refuses_a_non_empty_target(trained, tmp_path, home):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SftopError, match="not empty"):
        export_run(trained, out=tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_stopped_run_exports_its_newest_checkpoint(trained, tmp_path, home):
    stopped = tmp_path / "stopped"
    shutil.copytree(trained, stopped)
    shutil.rmtree(stopped / "adapter")
    out = export_run(stopped, out=tmp_path / "from-checkpoint")
    # Training saves at step 2 (save_steps) and at its last step, 3: the newest one is exported.
    assert [p.name for p in RunDir(stopped).complete_checkpoints()] == ["checkpoint-2", "checkpoint-3"]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        stopped / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"
    ).read_bytes()
    shutil.rmtree(stopped / "checkpoints")
    with pytest.raises(SftopError, match="no adapter and no complete checkpoint"):
        export_run(stopped, out=tmp_path / "nothing")


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exports_get_the_modes_of_the_users_umask(trained, tmp_path, home, mask, dir_mode, file_mode):
    import os
    import stat

    old = os.umask(mask)
    try:
        out = export_run(trained, merged=False, out=tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode  # not mkdtemp's owner-only 0700
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {file_mode}
