"""Preset loading, overrides, validation messages and round-trips."""

from __future__ import annotations

import pytest

from sftop.engine.errors import PresetError
from sftop.engine.presets import list_presets, load_preset, parse_override, save_user_preset, to_toml
from sftop.engine.presets.schema import Preset

REQUIRED_KEYS = [
    "model.name",
    "model.load_in_4bit",
    "lora.r",
    "lora.alpha",
    "lora.targets",
    "data.source",
    "data.format",
    "data.max_length",
    "data.packing",
    "train.max_steps",
    "train.epochs",
    "train.learning_rate",
    "train.effective_batch",
    "train.seed",
    "plan.micro_batch",
    "plan.grad_accum",
    "plan.gradient_checkpointing",
]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "home"))


def test_required_keys_exist():
    for dotted in REQUIRED_KEYS:
        section, key = dotted.split(".")
        assert key in Preset.model_fields[section].annotation.model_fields, dotted


def test_builtin_presets_all_validate():
    names = {p.name for p in list_presets()}
    assert {"demo", "llama-3.1-8b-qlora-24gb"} <= names
    for info in list_presets():
        preset, path = load_preset(info.name)
        assert path == info.path
        assert preset.name == info.name
    assert load_preset("llama-3.1-8b-qlora-24gb")[0].model.load_in_4bit is True


def test_override_types_and_nesting():
    preset, _ = load_preset(
        "demo",
        [
            "train.max_steps=20",
            "lora.r=8",
            "plan.micro_batch=4",
            "model.name=my/model",
            'lora.targets=["q_proj", "v_proj"]',
            "plan.gradient_checkpointing=true",
        ],
    )
    assert preset.train.max_steps == 20
    assert preset.lora.r == 8
    assert preset.plan.micro_batch == 4
    assert preset.plan.grad_accum == "auto"
    assert preset.model.name == "my/model"
    assert preset.lora.targets == ["q_proj", "v_proj"]
    assert preset.plan.gradient_checkpointing == "on"


def test_parse_override_bare_words_are_strings():
    assert parse_override("data.source=./rows.jsonl") == (["data", "source"], "./rows.jsonl")
    assert parse_override("train.learning_rate=1e-4") == (["train", "learning_rate"], 1e-4)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learnig_rate=1e-4", "did you mean `train.learning_rate`"),
        ("trian.max_steps=3", "did you mean `train`"),
        ("lora.r=0", "`lora.r` input should be greater than or equal to 1"),
        ('lora.r="big"', "`lora.r` input should be a valid integer"),
        ("plan.micro_batch=0", "`plan.micro_batch`"),
        ("data.format=xml", "`data.format`"),
        ("train.learning_rate=-1", "`train.learning_rate` input should be greater than 0"),
    ],
)
def test_bad_values_name_key_file_and_fix(override, expected):
    with pytest.raises(PresetError) as info:
        load_preset("demo", [override])
    message = str(info.value)
    assert expected in message
    assert "demo.toml" in message  # the file
    assert override in message  # the override that caused it


def test_bad_toml_file_names_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = \n")
    with pytest.raises(PresetError, match="bad.toml is not valid TOML"):
        load_preset(str(bad))


def test_unknown_preset_suggests_close_name():
    with pytest.raises(PresetError, match="Did you mean `demo`"):
        load_preset("dmeo")


def test_resolved_preset_round_trips(tmp_path):
    preset, _ = load_preset("demo", ["train.max_steps=7", "plan.grad_accum=2"])
    path = tmp_path / "preset.toml"
    path.write_text(to_toml(preset))
    again, _ = load_preset(str(path))
    assert again == preset


def test_user_presets_are_listed_and_loadable():
    preset, _ = load_preset("demo", ["train.max_steps=5"])
    saved = save_user_preset(preset, "mine")
    assert saved.parent.name == "presets"
    names = {p.name: p.origin for p in list_presets()}
    assert names["mine"] == "user"
    assert load_preset("mine")[0].train.max_steps == 5
