"""sftop speaks transformers' current checkpointing names, so the newest releases run without
FutureWarnings (and the tested ones still work)."""

from __future__ import annotations

import dataclasses
import warnings


@dataclasses.dataclass
class _OldArgs:
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None


@dataclasses.dataclass
class _NewArgs(_OldArgs):
    activation_checkpointing: bool | None = None
    activation_checkpointing_kwargs: dict | None = None


def test_training_arguments_get_the_names_the_installed_transformers_knows():
    from sftop.engine.train.checkpointing_api import checkpointing_args

    kwargs = {"use_reentrant": False}
    assert checkpointing_args(_OldArgs, True, kwargs) == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": kwargs,
    }
    assert checkpointing_args(_NewArgs, True, kwargs) == {
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": kwargs,
    }


def test_models_are_switched_by_the_new_method_when_there_is_one():
    from sftop.engine.train.checkpointing_api import enable_checkpointing

    calls = []

    class Old:
        def gradient_checkpointing_enable(self, **kw):
            calls.append(("old", kw))

    class New(Old):
        def activation_checkpointing_enable(self, **kw):
            calls.append(("new", kw))

    enable_checkpointing(Old(), {"use_reentrant": False}, every_n_layers=2)
    enable_checkpointing(New(), None, offload=True)
    assert calls == [
        ("old", {"gradient_checkpointing_kwargs": {"use_reentrant": False}, "every_n_layers": 2, "offload": False}),
        ("new", {"activation_checkpointing_kwargs": None, "every_n_layers": 1, "offload": True}),
    ]


def test_a_checkpointed_run_setup_raises_no_future_warning(sftop_home, tmp_path):
    """Loading the demo with LoRA, building the trainer's config with checkpointing on and turning
    it on: with the newest transformers these all went through deprecated names."""
    from train_helpers import in_home

    from sftop.engine.models.loading import load_model
    from sftop.engine.presets import load_preset
    from sftop.engine.train.checkpointing_api import enable_checkpointing
    from sftop.engine.train.config import build_sft_config
    from types import SimpleNamespace

    mp = in_home(sftop_home)
    try:
        preset, _ = load_preset("demo")
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model, _, _ = load_model(preset)
            args = build_sft_config(
                preset,
                SimpleNamespace(micro_batch=4, grad_accum=4, gradient_checkpointing="on"),
                output_dir=tmp_path,
                dtype="fp32",
                packing=True,
                has_eval=False,
                on_cuda=False,
            )
            enable_checkpointing(model, {"use_reentrant": False})
    finally:
        mp.undo()
    assert args.gradient_checkpointing is True
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
