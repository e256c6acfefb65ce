"""transformers renamed gradient checkpointing to activation checkpointing (5.23): the old
`gradient_checkpointing*` arguments, methods and property still work until v6 but warn on every
run. sftop uses whichever names the installed transformers has, so both the tested and the
newest releases run without warnings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings


def checkpointing_args(config_cls, enabled: bool, kwargs: dict | None) -> dict:
    """The TrainingArguments fields that turn checkpointing on, by the names `config_cls` knows."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": kwargs}


def enable_checkpointing(model, kwargs: dict | None, every_n_layers: int = 1, offload: bool = False) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )


@contextlib.contextmanager
def third_party_checkpointing_reads():
    """PEFT still reads the deprecated `is_gradient_checkpointing` when it wraps a model; the
    warning is about PEFT's code, which the user cannot change, so it stays out of their terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
