"""The part of a captured step's key that describes the model: which tensors its parameters are,
which of them train, and what each adapter layer decides per call; listed once, not per call.

Why: the key guards a replay against a model that changed under the graph.  A captured step bakes
in the parameters' addresses (a parameter replaced by another tensor would leave the graph reading
freed memory), differentiates a fixed set of trainable parameters (freezing or unfreezing one must
not reuse it), and runs the adapter path PEFT chose when it was captured (an adapter disabled,
merged or switched must not replay the old path).  Building that from scratch lists every module:
a 1B LoRA model's 1,300 of them cost 5-15 ms of host time per micro-batch, at the start of a step
while the GPU waits.

How: `ModelLayout` lists the modules' parameters as (module, name) and the adapter layers once.
Each call reads the parameters through that list (new tensors, new `requires_grad` and adapter
flags are seen) and builds the key from them.  (Whether checkpointing is on is read
through the list as well.)  The list goes stale only when the model's structure
changes; that is noticed three ways:
  * a module of a listed model registering a parameter or a submodule (PEFT adding an adapter, a
    parameter assigned as an attribute) bumps a count that `slots()` checks (registrations on
    other modules, such as the containers transformers builds during a forward, do not);
  * a listed parameter gone from its module makes `slots()` answer None;
  * a call that would capture lists the model afresh before keying, so a captured step only ever
    holds a key built from an up-to-date list (a call that runs eagerly uses no parameter list,
    so an eager packed run does not pay for a listing per micro-batch either).
Direct writes into a module's `_parameters` (the capture's own aliasing, loaders placing weights)
register nothing, but change the tensor, which the key sees through its address.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

_registrations = 0  # parameters and submodules registered on a module of a listed model
# The modules of every listed model.  Only registrations on these count: transformers builds
# throwaway containers during a forward (slicing a ModuleList makes a new one), which must not
# make every call list the model again.
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _count_registration(module, *_args) -> None:
    global _registrations
    if module in _watched:
        _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def registrations() -> int:
    return _registrations


def adapter_layers(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = []
    for name, m in lm.named_modules():
        disabled, active = getattr(m, "disable_adapters", None), getattr(m, "active_adapters", None)
        # PEFT's adapter layers answer with values; transformers' adapter mixin has methods of these names
        if disabled is None or active is None or callable(disabled) or callable(active):
            continue
        layers.append((name, m))
    return layers


def layer_state(layers: list[tuple[str, nn.Module]]) -> tuple:
    return tuple(
        (name, bool(m.disable_adapters), bool(getattr(m, "merged", False)), tuple(m.active_adapters))
        for name, m in layers
    )


def adapter_state(lm: nn.Module) -> tuple:
    """What PEFT decides per call, for every adapter layer: disabled, merged, active adapters."""
    return layer_state(adapter_layers(lm))


class ModelLayout:
    """A model's parameters (as module and name) and adapter layers, listed once; see the module
    docstring for when the list is made afresh."""

    def __init__(self, lm: nn.Module):
        self._layout: tuple | None = None
        self.scans = 0
        self.rescan(lm)

    def rescan(self, lm: nn.Module) -> bool:
        """List the parameters and adapter layers afresh; True when the layout changed."""
        self._registrations = registrations()
        modules = list(lm.modules())
        _watched.update(modules)
        self._slots = [(m, name) for m in modules for name, p in m._parameters.items() if p is not None]
        self._layers = adapter_layers(lm)
        # transformers' `is_gradient_checkpointing` walks every module per call to read these flags
        self._checkpointable = [m for m in modules if hasattr(m, "gradient_checkpointing")]
        self.scans += 1
        layout = (tuple((id(m), n) for m, n in self._slots), tuple((id(m), n) for n, m in self._layers))
        changed, self._layout = layout != self._layout, layout
        return changed

    def slots(self) -> list | None:
        """(module, name, parameter) of every parameter, looked up now; None when the list may be
        stale (a listed parameter is gone, or a parameter or module was registered since)."""
        if self._registrations != registrations():
            return None
        out = []
        for m, name in self._slots:
            p = m._parameters.get(name)
            if p is None:
                return None
            out.append((m, name, p))
        return out

    def adapter_state(self) -> tuple:
        return layer_state(self._layers)

    def checkpointing(self) -> bool:
        """transformers' `is_gradient_checkpointing`, read from the listed modules."""
        return any(bool(m.gradient_checkpointing) for m in self._checkpointable)


def layout_of(graphs, lm: nn.Module) -> ModelLayout:
    """The layout kept on a model's StepGraphs (one per model), listed at its first use."""
    if graphs.layout is None:
        graphs.layout = ModelLayout(lm)
    return graphs.layout


def keyed_slots(
    lm: nn.Module, layout: ModelLayout, head: tuple, would_capture: Callable[[tuple], bool]
) -> tuple[tuple | None, list | None]:
    """(key, slots) of a call: `head` (the call's own shapes and modes) followed by every
    parameter's address and `requires_grad` and every adapter layer's state, read through `layout`.
    A key that `would_capture` (StepGraphs.would_capture) is built again from a fresh listing when
    the listing changed.  (None, None) when the model cannot be listed."""

    def keyed():
        slots = layout.slots()
        if slots is None:
            return None, None
        params = tuple((p.data_ptr(), p.requires_grad) for _m, _n, p in slots)
        return head + (params, layout.adapter_state()), slots

    key, slots = keyed()
    if slots is None or would_capture(key):
        if layout.rescan(lm) or slots is None:
            key, slots = keyed()
    return key, slots
