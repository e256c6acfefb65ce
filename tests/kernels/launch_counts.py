"""Count, per decoder layer, what a training step launches: ATen compute ops (each one a GPU kernel
launch or more on CUDA; views and allocations are left out), Triton kernel launches, and autograd
graph nodes.  Speed on the CPU means nothing, but these counts are what the host overhead of a
small-model step scales with.

Per layer = (model with 3 layers) - (model with 2 layers), forward + backward, LoRA r=4 on all
linears, so embedding, loss and optimizer are cancelled out.

    python tests/kernels/launch_counts.py            # this checkout
    # an older commit, for a before/after table:
    git archive <commit> sftop | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python tests/kernels/launch_counts.py
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # the counts are taken on the CPU through Triton's interpreter; set it only for a run as a script:
    # imported by the test suite on a GPU machine, it would switch every later test to the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NOT_LAUNCHES = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "set_",
    "resize_",
    "_local_scalar_dense",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "is_same_size",
    "promote_types",
}
_TRITON_LAUNCHES = [0]
_IN_TRITON = [False]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # the Triton interpreter moves tensors through numpy with aten copies; a GPU launch does not
        if not func.is_view and name not in _NOT_LAUNCHES and not _IN_TRITON[0]:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _count_triton():
    """Wrap Triton's launch entry points (once); returns the counter they increment."""
    counter = _TRITON_LAUNCHES
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        return counter
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        real = cls.run
        if getattr(real, "_counted", False):
            continue

        def run(self, *a, _real=real, **k):
            counter[0] += 1
            _IN_TRITON[0] = True
            try:
                return _real(self, *a, **k)
            finally:
                _IN_TRITON[0] = False

        run._counted = True
        cls.run = run
    return counter


def _graph_nodes(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(f for f, _ in n.next_functions)
    return len(seen)


def _step_counts(
    layers: int, patched: bool, checkpointed: bool, family: str, triton_counter, dtype=torch.float32
) -> dict:
    from _tiny_models import tiny_config

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import sftop.kernels as K

    torch.manual_seed(0)
    cfg = tiny_config(family)
    cfg.num_hidden_layers = layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )
    if patched:
        K.patch_model(model)
    model.train()
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ids = torch.randint(3, 300, (2, 16))
    batch = dict(input_ids=ids, labels=ids, use_cache=False)
    model(**batch).loss.backward()  # warm-up: first-call caches
    model.zero_grad(set_to_none=True)
    triton_counter[0] = 0
    with _CountOps() as ops:
        loss = model(**batch).loss
        nodes = _graph_nodes(loss)
        loss.backward()
    return {"aten": ops.n, "triton": triton_counter[0], "autograd_nodes": nodes}


def per_layer_counts(patched: bool, checkpointed: bool = False, family: str = "llama", dtype=torch.float32) -> dict:
    counter = _count_triton()
    two = _step_counts(2, patched, checkpointed, family, counter, dtype)
    three = _step_counts(3, patched, checkpointed, family, counter, dtype)
    return {k: three[k] - two[k] for k in two}


def main() -> None:
    import sftop.kernels

    print(f"sftop from {os.path.dirname(sftop.kernels.__file__)}")
    print(f"{'dtype':<9} {'path':<6} {'checkpointing':<14} {'aten ops':>9} {'triton':>7} {'autograd nodes':>15}")
    for dtype in (torch.bfloat16, torch.float32):
        for patched in (False, True):
            for ckpt in (False, True):
                c = per_layer_counts(patched, ckpt, dtype=dtype)
                print(
                    f"{str(dtype)[6:]:<9} {'sftop' if patched else 'stock':<6} {'on' if ckpt else 'off':<14} "
                    f"{c['aten']:>9} {c['triton']:>7} {c['autograd_nodes']:>15}"
                )


if __name__ == "__main__":
    main()
