"""The fused path's per-token activation term against what sftop's kernels really save.

A tiny Llama with PEFT LoRA on all seven projections is patched with sftop.kernels.patch_model (on the CPU
through Triton's interpreter), run forward once, and the autograd graph is walked from the loss: every
tensor a node keeps for backward is counted once per storage, parameters excluded. Two sequence lengths
give the bytes per token exactly. If the kernels start saving more (or less), the planner's estimate is no
longer the memory the GPU will need, and this fails before a measurement has to find out.
"""

from __future__ import annotations

import pytest
import torch

from sftop.engine.planner.estimate import ModelShape, Setup, estimate

H, I, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, R = 64, 160, 4, 2, 24, 2, 301, 4


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftop.kernels import kernels_available, patch_model

    ok, why = kernels_available()
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules="all-linear"))
    report = patch_model(model)
    if not all(v == "fused" for v in report.parts.values()):
        pytest.skip(f"not every kernel part applies here: {report.parts}")
    model.train()
    return cfg, model


def _saved(node) -> list[torch.Tensor]:
    out = []
    for name in dir(node):
        if name.startswith("_saved_"):
            try:
                value = getattr(node, name)
            except Exception:  # noqa: BLE001 - some saved slots are freed or not tensors
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            out += [t for t in values if isinstance(t, torch.Tensor)]
    try:
        out += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001 - only custom Functions have saved_tensors
        pass
    return out


def _saved_bytes(model, tokens: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, VOCAB, (1, tokens))
    loss = model(input_ids=ids, labels=ids).loss
    storages: dict[int, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in _saved(node):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
        stack += [n for n, _ in node.next_functions]
    return sum(storages.values())


def test_fused_path_saves_what_the_estimate_says():
    cfg, model = _model()
    per_token = (_saved_bytes(model, 128) - _saved_bytes(model, 64)) // 64
    shape = ModelShape.from_config(cfg)
    setup = Setup(lora_r=R, kernels=True, loss="fused")
    est = estimate(shape, setup, 1)
    modelled = est.terms["activations"] + est.terms["loss_saved"]  # L blocks + final norm + the loss's dX
    # Two small differences the estimate leaves in, on the safe side: the first block's norm input is the
    # embedding output, which needs no gradient (+h*2 + 4 over), and RoPE's cos/sin are shared by every
    # block (2 * head_dim * 2 not counted).
    assert per_token == modelled - (2 * H + 4) + 2 * HEAD_DIM * 2
    # ... and the fp32 input copies PEFT keeps on the stock path are gone: under half the stock term
    stock = estimate(shape, Setup(lora_r=R, kernels=False, loss="chunked"), 1).terms["activations"]
    assert per_token < 0.5 * stock
