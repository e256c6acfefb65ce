"""Packed vision-language runs through `sftop run`'s own path (CPU, float32): the same rows and the
same rows per optimizer step train to the same losses packed as padded, run_started says why
packing is on or off, and a packed run resumes."""

import shutil

import pytest

from sftop.engine.events import read_events
from sftop.engine.rundir import RunDir
from sftop.engine.train.runner import run_training
from train_helpers import in_home, of_type
from vlm_helpers import save_tiny_vlm, vlm_preset, write_colour_dataset, write_mixed_dataset

# float32 on the CPU: packed and padded batches sum the same per-token losses in another order
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory):
    return write_mixed_dataset(tmp_path_factory.mktemp("vlm-mixed"), rows=12, seed=3)


def _run(sftop_home, preset, run_dir, resume=False):
    mp = in_home(sftop_home)
    try:
        code = run_training(preset, run_dir, resume=resume)
    finally:
        mp.undo()
    records = read_events(run_dir / "events.jsonl")[0]
    assert code == 0, records[-1]
    return records


def _preset(source, model, packing, **train):
    return vlm_preset(
        source,
        model=model,
        data={"packing": packing, "max_length": 256},
        train={"max_steps": 3, "save_steps": 2, "effective_batch": 4, **train},
        plan={"micro_batch": 2, "grad_accum": 2},
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_packed_run_trains_as_the_padded_run(family, mixed_source, sftop_home, tmp_path):
    model = "builtin:demo-vlm-tiny" if family == "qwen2_vl" else str(save_tiny_vlm(tmp_path / "model", family))
    runs = {}
    for packing in (True, False):
        records = _run(sftop_home, _preset(mixed_source, model, packing), tmp_path / f"run-{packing}")
        runs[packing] = (of_type(records, "run_started")[0], of_type(records, "step"))
    (packed_start, packed), (padded_start, padded) = runs[True], runs[False]
    assert packed_start["environment"]["packing"] is True
    assert "packed into one padding-free row" in packed_start["environment"]["packing_reason"]
    assert packed_start["preset"]["data"]["packing"] is True and packed_start["plan"]["packing"] is True
    assert padded_start["environment"]["packing"] is False
    assert padded_start["environment"]["packing_reason"] == "data.packing = false"
    # same rows per optimizer step, exactly as the preset says
    for start in (packed_start, padded_start):
        assert (start["plan"]["micro_batch"], start["plan"]["grad_accum"]) == (2, 2)
    assert [s["step"] for s in packed] == [s["step"] for s in padded] == [1, 2, 3]
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        # the same non-padding tokens (a padded batch's padding is not counted)
        assert a["tokens_seen"] == b["tokens_seen"]
    assert packed[-1]["loss"] < packed[0]["loss"]


@pytest.mark.slow
def test_packed_vlm_run_resumes(mixed_source, sftop_home, tmp_path):
    run_dir = tmp_path / "run"
    preset = _preset(mixed_source, "builtin:demo-vlm-tiny", True)
    first = of_type(_run(sftop_home, preset, run_dir), "step")
    # resume from the step-2 checkpoint, so that step 3 is trained again
    shutil.rmtree(RunDir(run_dir).checkpoints / "checkpoint-3")
    longer = preset.model_copy(update={"train": preset.train.model_copy(update={"max_steps": 5})})
    records = _run(sftop_home, longer, run_dir, resume=True)
    started = of_type(records, "run_started")[-1]
    assert started["resumed_from_step"] == 2 and started["environment"]["packing"] is True
    steps = of_type(records, "step")
    assert [s["step"] for s in steps][-3:] == [3, 4, 5]
    # step 3 replayed from the step-2 checkpoint: the same packed rows, the same loss
    replayed = [s for s in steps if s["step"] == 3][-1]
    assert replayed["loss"] == pytest.approx(first[2]["loss"], rel=1e-4)


def test_family_that_cannot_pack_pads_and_says_why(sftop_home, tmp_path):
    """Gemma 3's image tokens attend both ways through a token-type mask: its rows stay padded."""
    source = write_colour_dataset(tmp_path / "data", rows=6, size=56)
    model = str(save_tiny_vlm(tmp_path / "model", "gemma3"))
    preset = vlm_preset(
        source,
        model=model,
        data={"packing": True, "max_length": 512},
        train={"max_steps": 1, "save_steps": 100, "effective_batch": 2},
        plan={"micro_batch": 2, "grad_accum": 1},
    )
    started = of_type(_run(sftop_home, preset, tmp_path / "run"), "run_started")[0]
    env = started["environment"]
    assert env["packing"] is False and env["packing_reason"].startswith("Gemma 3: its image tokens attend")
    assert started["preset"]["data"]["packing"] is False and started["plan"]["packing"] is False
    assert any("not packed" in n for n in started["plan"]["notes"])


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_run_on_gpu_trains_as_the_padded_run(mixed_source, sftop_home, tmp_path):
    """bf16 with sftop's kernels and the data-loader worker collating: packed == padded within 1e-2."""
    model = str(save_tiny_vlm(tmp_path / "model", "qwen2_5_vl"))
    runs = {}
    for packing in (True, False):
        preset = _preset(mixed_source, model, packing, kernels="auto")
        records = _run(sftop_home, preset, tmp_path / f"run-{packing}")
        runs[packing] = (of_type(records, "run_started")[0], of_type(records, "step"))
    (packed_start, packed), (_, padded) = runs[True], runs[False]
    assert packed_start["environment"]["packing"] is True and packed_start["kernels"]["enabled"] is True
    assert [s["step"] for s in packed] == [s["step"] for s in padded] == [1, 2, 3]
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
        assert a["tokens_seen"] == b["tokens_seen"]
