"""Switching a LoRA model's adapters off for the reference forward, without PEFT's status report.

Why: preference tuning compares the policy with the same model, adapters off (`dpo.reference =
"adapter-off"`), so TRL enters `PeftModel.disable_adapter()` once per micro-batch.  PEFT 0.21
starts that context by building the model's whole status report (`get_model_status`): every
parameter counted, every adapter layer's devices, quantisation backend and `repr` listed.  On a
Llama-3.1-8B NF4 DPO step that report was the largest stretch the GPU sat idle, about half of the
profiled step's idle time (docs/benchmarks.md, 2026-12-07; the 4-bit layers' `repr` is slow) just
to learn whether the adapters are on.

How: the same switch with only what PEFT reads from that report, each layer's `disable_adapters`
flag: adapters off on every adapter layer (PEFT's `disable_adapter_layers`, its warning about
biases included), then back on unless every layer had them off before, as PEFT does (with its
warning where they were mixed).  Prompt-learning and adaption-prompt models keep PEFT's own
context, which switches forwards rather than layers.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator

from torch import nn

SWITCH = "disable_adapter"


def install(model: nn.Module) -> bool:
    """Give `model` (a PeftModel with layer adapters such as LoRA) the fast `disable_adapter`;
    False where it keeps PEFT's own (not a PeftModel, or a prompt-learning kind)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return False
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, BaseTuner):
        return False
    config = model.peft_config.get(model.active_adapter)
    if config is None or config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        return False
    model.__dict__[SWITCH] = functools.partial(disable_adapter, model)
    return True


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The layers PEFT's status report counts: tuner layers and auxiliary-training wrappers,
    trainable-token wrappers left out (the layer they wrap counts)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper
    from peft.utils.other import TrainableTokensWrapper

    return [
        m
        for m in model.base_model.modules()
        if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not isinstance(m, TrainableTokensWrapper)
    ]


def adapters_enabled(model: nn.Module) -> bool | str:
    """True, False, or "irregular" (some layers on, some off): PEFT's `get_model_status().enabled`."""
    states = {not m.disable_adapters for m in _adapter_layers(model)}
    return states.pop() if len(states) == 1 else "irregular"


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """`PeftModel.disable_adapter` for layer adapters, its result and warnings the same."""
    was_disabled = model._adapters_disabled
    enabled = adapters_enabled(model)
    if enabled == "irregular":
        warnings.warn(
            "The model contains some adapter layers that are enabled and others that are disabled. "
            "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
            "will be enabled",
            stacklevel=3,
        )
    try:
        model.base_model.disable_adapter_layers()
        model._adapters_disabled = True
        yield
    finally:
        if enabled is not False:
            model.base_model.enable_adapter_layers()
        model._adapters_disabled = was_disabled
