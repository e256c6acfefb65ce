"""unpatch takes off everything a patch put on: a patched, checkpointed, trained-on model that is
unpatched must be indistinguishable from a never-patched twin of the same seed."""

import functools
import types

import torch

import sftop.kernels as K
from sftop.kernels.patching import markers

from _tiny_models import DEVICE, VOCAB, tiny_model, twin

GC_KWARGS = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
PLAIN = (bool, int, float, str, bytes, type(None), tuple, list, dict, set, frozenset, torch.dtype, torch.device)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 13), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {k: v.to(DEVICE) for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).items()}


def _same(a, b) -> bool:
    # the same stock code on the same inputs: bit for bit on the CPU; a GPU's attention backward
    # may add up in another order from run to run
    return torch.equal(a, b) if a.device.type == "cpu" else torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_function(a, b) -> bool:
    # closures made per model (transformers' hooks) are different objects of the same code
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, functools.partial):
        return _same_value(a.func, b.func) and _same_value(a.args, b.args) and _same_value(a.keywords, b.keywords)
    if isinstance(a, types.MethodType):
        return _same_function(a.__func__, b.__func__)
    if isinstance(a, types.FunctionType):
        return _same_function(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        # hook dicts are keyed by a process-wide handle counter: compare what they hold, in order
        same_keys = all(isinstance(k, int) for k in (*a, *b)) or a.keys() == b.keys()
        return same_keys and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a.values(), b.values()))
    if isinstance(a, PLAIN):
        return a == b
    return True  # other objects (configs, PEFT state): the same type is what a patch could change


def _differences(model, reference) -> list[str]:
    """Where `model`'s modules differ from `reference`'s: class, instance attributes (names, and the
    values of plain ones and of functions such as forward or the layers' checkpoint function)."""
    found = []
    mods, refs = dict(model.named_modules()), dict(reference.named_modules())
    if mods.keys() != refs.keys():
        return [f"module names differ: {sorted(mods.keys() ^ refs.keys())}"]
    for name, m in mods.items():
        r = refs[name]
        if type(m) is not type(r):
            found.append(f"{name}: {type(m).__name__} vs {type(r).__name__}")
        d, rd = vars(m), vars(r)
        if d.keys() != rd.keys():
            found.append(f"{name}: attributes {sorted(d.keys() ^ rd.keys())}")
            continue
        for key in d:
            if key in ("_parameters", "_buffers", "_modules"):
                if d[key].keys() != rd[key].keys():
                    found.append(f"{name}.{key}")
            elif not _same_value(d[key], rd[key]):
                found.append(f"{name}.{key}: {d[key]!r} vs {rd[key]!r}")
    return found


def test_unpatch_after_checkpointed_training_leaves_a_stock_model():
    never = tiny_model("llama")
    patched = twin(never)
    report = K.patch_model(patched)
    # the parts that change more than forwards: markers on the model and the layers' checkpoint function
    assert {p: report.parts[p] for p in ("rms_norm", "rope", "mlp", "attention_lora", "loss", "lean_recompute")} == {
        p: "fused" for p in ("rms_norm", "rope", "mlp", "attention_lora", "loss", "lean_recompute")
    }
    for m in (never, patched):
        m.train()
        m.gradient_checkpointing_enable(**GC_KWARGS)
    layer = patched.get_base_model().model.layers[0]
    assert layer._gradient_checkpointing_func.func.__name__ == "checkpoint_marking_recompute"
    batch = _batch(1)
    out, _ = _loss_and_grads(patched, batch)
    assert out.logits is None  # the fused loss ran

    K.unpatch(patched)

    assert _differences(patched, never) == []
    left = [
        (name, key)
        for name, m in patched.named_modules()
        for key in vars(m)
        if key in markers.ALL or key.startswith("_sftop_")
    ]
    assert left == []
    p_out, p_grads = _loss_and_grads(patched, batch)
    s_out, s_grads = _loss_and_grads(never, batch)
    assert p_out.logits is not None
    assert _same(p_out.loss, s_out.loss)
    assert _same(p_out.logits, s_out.logits)
    assert p_grads.keys() == s_grads.keys() and len(s_grads) > 0
    for name, g in s_grads.items():
        assert _same(p_grads[name], g), name

    # enabling checkpointing again is transformers' own method now, and patching again works
    patched.gradient_checkpointing_enable(**GC_KWARGS)
    never.gradient_checkpointing_enable(**GC_KWARGS)
    assert _differences(patched, never) == []
    assert K.patch_model(patched).parts["lean_recompute"] == "fused"
    patched.gradient_checkpointing_enable(**GC_KWARGS)
    assert layer._gradient_checkpointing_func.func.__name__ == "checkpoint_marking_recompute"


def test_the_comparison_sees_a_checkpoint_function_left_behind():
    # the check above must be able to fail: a layer still holding sftop's checkpoint function
    never = tiny_model("llama")
    patched = twin(never)
    K.patch_model(patched)
    for m in (never, patched):
        m.gradient_checkpointing_enable(**GC_KWARGS)
    wrapped = patched.get_base_model().model.layers[1]._gradient_checkpointing_func
    K.unpatch(patched)
    assert _differences(patched, never) == []
    patched.get_base_model().model.layers[1]._gradient_checkpointing_func = wrapped
    assert _differences(patched, never) == [
        "base_model.model.model.layers.1._gradient_checkpointing_func: "
        f"{wrapped!r} vs {never.get_base_model().model.layers[1]._gradient_checkpointing_func!r}"
    ]


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    # A frozen reference model is often a deep copy of the policy: its patched forwards must call
    # the copy's modules, not the ones they were first installed on.
    model = tiny_model("llama")
    assert K.patch_model(model).parts["rms_norm"] == "fused"
    model.eval()
    copy_ = twin(model)
    batch = _batch(2)
    with torch.no_grad():
        before = model(**batch, use_cache=False).loss
        for p in copy_.parameters():  # attention's patched forward calls its original: q/k/v/o too
            p.mul_(0.9)
        copied = copy_(**batch, use_cache=False).loss
        after = model(**batch, use_cache=False).loss
    assert _same(after, before)
    assert not torch.allclose(copied, before)
    # and the copy's result is the one stock code gives for the copy's weights
    K.unpatch(copy_)
    with torch.no_grad():
        stock = copy_(**batch, use_cache=False).loss
    assert torch.allclose(copied, stock, rtol=1e-5, atol=1e-6)
