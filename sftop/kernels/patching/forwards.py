"""How a part replaces a module instance's forward, and the model queries every part shares."""

from __future__ import annotations

import types

import torch
from torch import nn

from . import markers as M

FUSED = "fused"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The HF PreTrainedModel under a PeftModel (or the model itself)."""
    if type(model).__module__.startswith("peft") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def set_forward(module: nn.Module, fn, part: str) -> None:
    """Make `module`'s forward call `fn(module, original_forward, *args, **kwargs)`.  A second call
    (the same part again, or a later part taking the module over) swaps `fn` and keeps the original."""
    d = module.__dict__
    d[M.FUNCTION] = fn
    d[M.PART] = part
    d[M.OFF] = False
    if M.ORIG_FORWARD in d:
        if d.get("forward") is not d.get(M.FORWARD):
            # another library (TRL's fused LM head, say) wrapped our wrapper: it keeps calling
            # ours, which now runs `fn` again; nothing to re-install
            return
    else:
        d[M.ORIG_FORWARD] = d.get("forward")
    module.forward = types.MethodType(_patched_forward, module)
    d[M.FORWARD] = module.forward


def _patched_forward(self, *a, **k):
    # Everything is looked up on the instance at call time, never held in a closure: a deep copy
    # of a patched model (a frozen reference model, say) rebinds these bound methods to the copy,
    # so the copy runs its own weights.
    d = self.__dict__
    original = d.get(M.ORIG_FORWARD)
    base = original if original is not None else types.MethodType(type(self).forward, self)
    if d.get(M.OFF):
        return base(*a, **k)
    return d[M.FUNCTION](self, base, *a, **k)


def restore_forward(module: nn.Module) -> None:
    """Undo `set_forward` and drop every marker a part left on the instance."""
    d = module.__dict__
    if M.ORIG_FORWARD not in d:
        return
    if d.get("forward") is not d.get(M.FORWARD):
        # someone else's forward sits on top and calls ours: removing ours would drop theirs,
        # so ours becomes a pass-through instead
        d[M.OFF] = True
        return
    original = d.pop(M.ORIG_FORWARD)
    d.pop("forward", None)
    for key in M.MODULE_MARKERS:
        d.pop(key, None)
    if original is not None:
        module.forward = original


def commonest_refusal(modules, refusal, noun: str) -> str | None:
    """ "stock: <the most frequent reason> (n of N <noun>)" when `refusal(m)` refuses any of
    `modules` (a part takes all of them or none), else None."""
    refusals: dict[str, int] = {}
    for m in modules:
        why = refusal(m)
        if why:
            refusals[why] = refusals.get(why, 0) + 1
    if not refusals:
        return None
    why, n = max(refusals.items(), key=lambda kv: kv[1])
    return f"stock: {why} ({n} of {len(modules)} {noun})"


def modules_of(model: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name]


def family_modules(model: nn.Module, spec, class_name: str) -> list[nn.Module]:
    """The instances of `class_name` among the family's layers (under `spec.layers_at`, when set)."""
    root = model
    if spec.layers_at:
        for name in spec.layers_at.split("."):
            root = getattr(root, name, None)
            if not isinstance(root, nn.Module):
                return []
    return modules_of(root, class_name)


def quantised_compute_dtype(model: nn.Module):
    """The bitsandbytes compute dtype of a k-bit model, else None.

    prepare_model_for_kbit_training leaves lm_head and the residual stream in fp32, which makes
    the head matmul an fp32 (non-tensor-core) GEMM over the whole vocabulary -- the largest single
    cost of a QLoRA step.  The quantised layers already compute in this dtype, so the fused loss
    runs its two head matmuls in it too (the softmax and loss stay fp32).
    """
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    if not (get("load_in_4bit", False) or get("load_in_8bit", False)):
        return None
    dt = get("bnb_4bit_compute_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt.replace("torch.", ""), None)
    return dt if isinstance(dt, torch.dtype) and dt != torch.float32 else None
