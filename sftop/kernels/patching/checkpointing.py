"""The model's `gradient_checkpointing_enable` override that parts lean_recompute and
checkpoint_offload share: it gives the decoder layers sftop's checkpoint function when either is on,
and `uninstall` puts back transformers' own on every layer."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

from torch import nn

from .. import compat
from . import markers as M


def _layer_checkpoint_function(stock_fn, gc_kwargs: dict, lean: bool, overlapped: bool):
    """The `_gradient_checkpointing_func` for the decoder layers: transformers' own (`stock_fn`) or
    torch's non-reentrant checkpoint with overlapped offload of the saved inputs, optionally telling
    the kernels when they run as a recomputation (sftop/kernels/recompute.py)."""
    from ..checkpoint_offload import checkpoint_function
    from ..recompute import checkpoint_marking_recompute

    inner = checkpoint_function(gc_kwargs) if overlapped else stock_fn
    if not lean:
        return inner
    # with offload, the first run can move large tensors for its recomputation along with the
    # layer input (the attention output: sftop/kernels/kept_attention.py)
    hooks = inner.keywords["_offload"] if overlapped else None
    return functools.partial(checkpoint_marking_recompute, _checkpoint=inner, _offload=hooks)


def layer_stack(name: str) -> str:
    """The container of the layer named `name` ("model.visual.blocks" for "model.visual.blocks.3").

    Each stack gets its own offload hooks.  Their chain of saved inputs fetches the next layer's
    input ahead in backward, which is right within a stack but not across two: a vision-language
    model's tower and language layers may replay from separate CUDA graphs (vision_graphs.py,
    language_graphs.py), and a copy the language layers' captured backward started for the tower's
    last block would land in the language graphs' pool, unread by the tower's own replay."""
    return name.rsplit(".", 1)[0] if "." in name else ""


@dataclass
class _Enabled:
    """What the last full enable was asked, the modules with a checkpointing flag, and while paused
    the flags they had when the disable came (None: not paused)."""

    args: tuple
    modules: list[nn.Module]
    paused_flags: list[bool] | None = None


def install(model: nn.Module) -> None:
    """Wrap the model's `gradient_checkpointing_enable` (what Trainer calls) so that the layers get
    `_layer_checkpoint_function` when the parts that need it are on, and its
    `gradient_checkpointing_disable` so that switching off and back on with the same arguments is
    a pause.  Idempotent.

    The pause: TRL's DPOTrainer switches checkpointing off around every reference forward and back
    on with the same arguments.  Done in full, each switch walks every module twice and builds
    fresh checkpoint functions (20 ms a micro-batch on a CPU for a 32-layer LoRA model, while the
    GPU waits), and each enable registers one more forward hook on the input embeddings, which
    transformers' disable leaves in place for a PeftModel's base: a hook more per micro-batch, run
    by every later forward, for the whole run.  Here the disable records which modules had
    checkpointing on and turns their flags off; an enable with the arguments of the last full one
    turns those flags back on, which is the state the full enable would build again.  Anything
    else takes the full path, and a full enable that registers the input-gradient hooks again
    removes the ones an earlier enable registered, so there is one set at a time."""
    if M.GC_ENABLE in model.__dict__:
        return
    original = getattr(model, M.GC_ENABLE)
    original_disable = getattr(model, M.GC_DISABLE)

    def gradient_checkpointing_enable(
        gradient_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        gc_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        # Trainer pops these two from TrainingArguments' dict before it calls here, but TRL's
        # DPOTrainer re-enables checkpointing after every reference forward with the whole dict:
        # read there too, or every step after the first silently loses the plan's offload and
        # checkpoint spacing (a DPO plan's "offload" peaked as high as "on": docs/benchmarks.md)
        every_n_layers = int(gc_kwargs.pop("every_n_layers", every_n_layers))
        offload = bool(gc_kwargs.pop("offload", offload))
        args = (repr(sorted(gc_kwargs.items())), gradient_checkpointing_kwargs is None, every_n_layers, offload)
        last = model.__dict__.get(M.GC_LAST)
        if last is not None and last.paused_flags is not None and last.args == args:
            for m, flag in zip(last.modules, last.paused_flags):
                m.gradient_checkpointing = flag
            last.paused_flags = None
            return
        given = None if gradient_checkpointing_kwargs is None else (gc_kwargs or None)
        # reentrant checkpointing saves nothing through autograd's hooks and recomputes inside
        # its own backward: neither of our changes applies to it
        ours = gc_kwargs.get("use_reentrant", True) is False
        overlapped = ours and offload and model.__dict__.get(M.OFFLOAD_OK, False)
        lean = ours and model.__dict__.get(M.LEAN, False)
        # the enable below may register the input embeddings' gradient hooks afresh (transformers
        # keeps them in a new list): the earlier set then goes, so there is one set at a time
        earlier_hooks = getattr(model, "_require_grads_hooks", None)
        with warnings.catch_warnings():
            # transformers >= 5.23 routes activation_checkpointing_enable through this override and
            # calls the old name deprecated: the wrapper is the only hook there is, not a user's choice
            warnings.filterwarnings(
                "ignore", message=r"`gradient_checkpointing_enable` is deprecated", category=FutureWarning
            )
            original(
                gradient_checkpointing_kwargs=given,
                every_n_layers=every_n_layers,
                offload=offload and not overlapped,
            )
        if earlier_hooks and getattr(model, "_require_grads_hooks", None) is not earlier_hooks:
            for hook in earlier_hooks:
                hook.remove()
        # transformers' blocking offload allocates pinned memory per tensor: not capturable
        model.__dict__[M.OFFLOADING] = bool(offload and not overlapped)
        model.__dict__[M.GC_MODE] = (lean, overlapped)  # part of a captured step's key
        if overlapped or lean:
            fns = {}  # one function per stack of layers: its offload hooks chain the saved inputs
            for name, m in model.named_modules():
                stock_fn = compat.checkpoint_function(m)
                if stock_fn is not None:
                    key = (id(stock_fn), layer_stack(name))
                    if key not in fns:
                        fns[key] = _layer_checkpoint_function(stock_fn, gc_kwargs, lean, overlapped)
                    # what unpatch puts back (transformers sets a fresh one on every enable call)
                    m.__dict__[M.STOCK_CHECKPOINT_FUNCTION] = stock_fn
                    compat.set_checkpoint_function(m, fns[key])
        flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        model.__dict__[M.GC_LAST] = _Enabled(args, flagged)

    def gradient_checkpointing_disable():
        last = model.__dict__.get(M.GC_LAST)
        # transformers' disable also removes the input-gradient hooks of a model with PEFT loaded
        # through transformers' own integration: that case keeps the full path
        if last is None or getattr(model, "_hf_peft_config_loaded", False):
            model.__dict__.pop(M.GC_LAST, None)
            return original_disable()
        if last.paused_flags is None:
            last.paused_flags = [bool(m.gradient_checkpointing) for m in last.modules]
            for m in last.modules:
                m.gradient_checkpointing = False
        return None

    model.__dict__[M.GC_ENABLE] = gradient_checkpointing_enable
    model.__dict__[M.GC_DISABLE] = gradient_checkpointing_disable


def uninstall(model: nn.Module) -> None:
    """transformers' own checkpoint function back on every layer, and its own enable method."""
    for m in model.modules():
        stock_fn = m.__dict__.pop(M.STOCK_CHECKPOINT_FUNCTION, None)
        if stock_fn is not None:
            compat.set_checkpoint_function(m, stock_fn)
    for key in M.MODEL_MARKERS:
        if key != M.ATTN_IMPLEMENTATION:  # part attention's, which its undo restores
            model.__dict__.pop(key, None)
