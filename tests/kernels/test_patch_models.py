"""Whole tiny models: the patched forward/backward must match the stock one."""

import pytest
import torch

import sftop.kernels as K
from sftop.kernels.patching.markers import ORIG_FORWARD as _ORIG

from _kernel_testutil import rel_err
from _tiny_models import DEVICE, FAMILIES, VOCAB, tiny_model, twin


TRITON_PARTS = ("rms_norm", "rope", "mlp", "lora", "attention_lora", "loss")


def _batch(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "packed":
        # three documents in one padding-free row; positions restart per document
        lens = [7, 12, 9]
        ids = torch.randint(3, VOCAB, (1, sum(lens)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        labels = ids.clone()
        starts = torch.tensor([0, 7, 19])
        labels[0, starts] = -100  # a document's first token has no in-document predecessor
        return _to(dict(input_ids=ids, position_ids=pos, labels=labels))
    ids = torch.randint(3, VOCAB, (2, 15), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a masked prompt
    return _to(dict(input_ids=ids, attention_mask=mask, labels=labels))


def _to(batch):
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    # as in training (TRL passes it too): with a cache, transformers' SDPA path ignores the row
    # boundaries of a packed batch, while sftop's packed attention always keeps rows apart
    out = model(**batch, use_cache=False, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


MODES = ["padded", "packed", "checkpointed"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_patched_model_matches_stock(family, mode):
    stock = tiny_model(family)
    fused = twin(stock)
    report = K.patch_model(fused)
    assert report.family == family
    assert {p: report.parts[p] for p in TRITON_PARTS} == {p: "fused" for p in TRITON_PARTS}
    # packed attention needs CUDA and bf16/fp16 (tests/kernels/test_varlen_attention.py); these
    # fp32 twins keep SDPA, and say why
    assert report.parts["attention"].startswith("stock: ")
    for m in (stock, fused):
        m.train()
        if mode == "checkpointed":
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch("packed" if mode == "packed" else "padded", seed=FAMILIES.index(family) * 10 + MODES.index(mode))
    kw = {"num_items_in_batch": torch.tensor(40)} if mode == "packed" else {}

    s_out, s_grads = _loss_and_grads(stock, batch, **kw)
    f_out, f_grads = _loss_and_grads(fused, batch, **kw)

    assert f_out.logits is None  # the full logits were never built
    assert rel_err(f_out.loss, s_out.loss) < 1e-5
    assert len(f_grads) == len(s_grads) > 0
    for name, g in s_grads.items():
        assert g.abs().sum() > 0, name
        assert rel_err(f_grads[name], g) < 1e-4, name


def test_loss_honours_shift_labels_and_num_items():
    stock = tiny_model("llama")
    fused = twin(stock)
    K.patch_model(fused)
    b = _batch("packed", 3)
    shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[..., 1:]
    inputs = dict(input_ids=b["input_ids"], position_ids=b["position_ids"])
    s = stock(**inputs, labels=b["labels"], num_items_in_batch=torch.tensor(11))
    f = fused(**inputs, shift_labels=shift, num_items_in_batch=torch.tensor(11))
    assert rel_err(f.loss, s.loss) < 1e-5
    # dividing by a different count must change the loss: the argument is really used
    f2 = fused(**inputs, shift_labels=shift, num_items_in_batch=torch.tensor(22))
    assert abs(f2.loss.item() * 2 - f.loss.item()) < 1e-5


def test_unpatched_models_and_generation_stay_stock():
    a = tiny_model("llama")
    b = twin(a)
    K.patch_model(a)
    assert any(_ORIG in m.__dict__ for m in a.modules())
    assert not any(_ORIG in m.__dict__ for m in b.modules())
    ids = torch.randint(3, VOCAB, (1, 6), device=DEVICE)
    # without labels the stock forward runs and logits come back (generation, metrics)
    out = a(input_ids=ids)
    assert out.logits is not None and out.logits.shape == (1, 6, VOCAB)
    assert rel_err(out.logits, b(input_ids=ids).logits) < 1e-5
    report = K.patch_model(a, enable=False)
    assert set(report.parts.values()) == {"stock: disabled"}
    assert not any(_ORIG in m.__dict__ for m in a.modules())
    assert a(input_ids=ids, labels=ids).logits is not None


def test_patch_is_idempotent():
    a = tiny_model("qwen3")
    b = twin(a)
    K.patch_model(a)
    K.patch_model(a)
    batch = _batch("padded", 5)
    assert rel_err(a(**batch).loss, b(**batch).loss) < 1e-5


def test_unavailable_kernels_change_nothing(monkeypatch):
    import sftop.kernels.patching.core as core

    monkeypatch.setattr(core, "kernels_available", lambda: (False, "no CUDA GPU: test"))
    m = tiny_model("llama")
    report = K.patch_model(m)
    assert report.parts == {p: "stock: no CUDA GPU: test" for p in core.PARTS}
    assert report.to_dict()["family"] == "llama"
    assert not any(_ORIG in mod.__dict__ for mod in m.modules())


def test_unsupported_family_reports_reason():
    from transformers import AutoModelForCausalLM, GPT2Config

    m = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    report = K.patch_model(m)
    assert report.family == "gpt2"
    assert all(v.startswith("stock: family 'gpt2' not supported") for v in report.parts.values())


def test_lora_on_lm_head_keeps_stock_loss():
    m = tiny_model("llama", target_modules=["q_proj", "lm_head"])
    report = K.patch_model(m)
    assert report.parts["loss"].startswith("stock: lm_head is")
    assert report.parts["rms_norm"] == "fused"


def test_kernels_available_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = K.kernels_available()
    assert ok == torch.cuda.is_available()
    if not ok:
        assert "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.kernels_available() == (True, "")


def _vs_reference(model, ref_grads, ref_loss, batch):
    out, grads = _loss_and_grads(model, batch)
    return rel_err(out.loss, ref_loss), _all_grads_err(grads, ref_grads)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_bf16_patched_model_no_worse_than_stock_bf16(family):
    # both bf16 runs are compared with an fp32 stock run of the same weights: the fused path
    # must be about as close to it as HF's own bf16 path is
    ref = tiny_model(family)
    batch = _batch("packed", 11)
    r_out, r_grads = _loss_and_grads(ref, batch)
    stock = twin(ref).to(torch.bfloat16)
    fused = twin(ref).to(torch.bfloat16)
    K.patch_model(fused)
    s_loss_err, s_grad_err = _vs_reference(stock, r_grads, r_out.loss, batch)
    f_loss_err, f_grad_err = _vs_reference(fused, r_grads, r_out.loss, batch)
    assert f_loss_err < max(3 * s_loss_err, 1e-2)
    assert f_grad_err < max(3 * s_grad_err, 4e-2)


def _nf4(compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _all_grads_err(grads, ref):
    names = sorted(ref)
    return rel_err(
        torch.cat([grads[n].flatten().double() for n in names]), torch.cat([ref[n].flatten().double() for n in names])
    )


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_qlora_4bit_fp32_compute_matches_stock(family):
    # bitsandbytes' NF4 also runs on the CPU; with an fp32 compute dtype the patched QLoRA model
    # must reproduce the stock one to fp32 rounding (same quantised weights, same LoRA init)
    stock = tiny_model(family, dtype=torch.float32, quant=_nf4(torch.float32))
    fused = tiny_model(family, dtype=torch.float32, quant=_nf4(torch.float32))
    report = K.patch_model(fused)
    assert {report.parts[p] for p in TRITON_PARTS} == {"fused"}, report.parts
    # Layer 0's q/k/v read the frozen embeddings.  Without an input that needs grad, stock
    # bitsandbytes takes its inference gemm_4bit kernel there, which on the CPU rounds through
    # bf16 (about 2e-3 relative); the patched path always dequantises and multiplies in fp32.
    # Making the input need grad puts stock on its dequantise-then-matmul path as well.
    for m in (stock, fused):
        m.enable_input_require_grads()
    batch = _batch("padded", 13)
    s_out, s_grads = _loss_and_grads(stock, batch)
    f_out, f_grads = _loss_and_grads(fused, batch)
    assert rel_err(f_out.loss, s_out.loss) < 1e-5
    for name, g in s_grads.items():
        assert rel_err(f_grads[name], g) < 1e-4, name


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_qlora_4bit_bf16_compute_close_to_fp32_compute(family):
    # With a bf16 compute dtype the patched path runs activations after each norm, LoRA and the
    # head matmuls in bf16 (stock keeps them fp32).  Both are judged against the fp32-compute
    # model with the same 4-bit weights; errors are over all LoRA gradients together.
    ref = tiny_model(family, dtype=torch.float32, quant=_nf4(torch.float32))
    stock = tiny_model(family, dtype=torch.bfloat16, quant=_nf4(torch.bfloat16))
    fused = tiny_model(family, dtype=torch.bfloat16, quant=_nf4(torch.bfloat16))
    assert {K.patch_model(fused).parts[p] for p in TRITON_PARTS} == {"fused"}
    batch = _batch("padded", 17)
    r_out, r_grads = _loss_and_grads(ref, batch)
    s_out, s_grads = _loss_and_grads(stock, batch)
    f_out, f_grads = _loss_and_grads(fused, batch)
    s_loss, f_loss = rel_err(s_out.loss, r_out.loss), rel_err(f_out.loss, r_out.loss)
    s_grad, f_grad = _all_grads_err(s_grads, r_grads), _all_grads_err(f_grads, r_grads)
    assert f_loss < max(3 * s_loss, 5e-3), (f_loss, s_loss)
    # measured on the CPU: about 0.025 patched vs 0.007-0.010 stock
    assert f_grad < max(3 * s_grad, 4e-2), (f_grad, s_grad)


@pytest.mark.parametrize(
    "lora_kw,reason",
    [(dict(lora_dropout=0.1), "LoRA dropout > 0"), (dict(use_dora=True), "DoRA"), (dict(lora_bias=True), "LoRA bias")],
)
def test_lora_configs_the_fast_path_cannot_reproduce_stay_stock(lora_kw, reason):
    m = tiny_model("llama", **lora_kw)
    report = K.patch_model(m)
    assert report.parts["lora"].startswith("stock: ") and reason in report.parts["lora"]
    assert report.parts["rms_norm"] == "fused"


def test_lora_fast_path_defers_to_peft_when_adapters_are_disabled():
    stock = tiny_model("llama")
    fused = twin(stock)
    assert K.patch_model(fused).parts["lora"] == "fused"
    batch = _batch("padded", 9)
    with stock.disable_adapter(), fused.disable_adapter():
        a, b = stock(**batch).loss, fused(**batch).loss
    assert rel_err(b, a) < 1e-5
    # and the adapters really are on otherwise (a different loss)
    assert abs(fused(**batch).loss.item() - a.item()) > 1e-4


def test_unpatch_under_a_foreign_wrapper_keeps_the_wrapper():
    import types

    m = tiny_model("llama")
    base = m.get_base_model()
    K.patch_model(m)
    inner = base.forward
    seen = []

    def outer(self, *a, **k):  # what TRL's add_fused_lm_head does to the CausalLM
        seen.append(1)
        return inner(*a, **k)

    base.forward = types.MethodType(outer, base)
    batch = _batch("padded", 2)
    assert m(**batch).logits is None  # ours still runs under the wrapper
    K.patch_model(m, enable=False)
    out = m(**batch)
    assert out.logits is not None and len(seen) == 2  # wrapper kept, ours passes through
    K.patch_model(m)
    assert m(**batch).logits is None and len(seen) == 3  # and can be switched back on


def test_reentrant_checkpointing_matches_stock():
    # HF's older default: torch.utils.checkpoint with use_reentrant=True re-enters the patched
    # forwards from inside backward
    stock = tiny_model("qwen3")
    fused = twin(stock)
    K.patch_model(fused)
    for m in (stock, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
    batch = _batch("packed", 21)
    s_out, s_grads = _loss_and_grads(stock, batch)
    f_out, f_grads = _loss_and_grads(fused, batch)
    assert rel_err(f_out.loss, s_out.loss) < 1e-5
    for name, g in s_grads.items():
        assert g.abs().sum() > 0, name
        assert rel_err(f_grads[name], g) < 1e-4, name


def test_imports_and_degrades_without_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import sftop.kernels as K\n"
        "ok, why = K.kernels_available(); assert not ok and 'triton' in why, why\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, vocab_size=40))\n"
        "r = K.patch_model(m); assert all(v.startswith('stock: triton not importable') for v in r.parts.values())\n"
        "assert not any('_sftop_orig_forward' in mod.__dict__ for mod in m.modules())\n"
        "assert 'sftop.engine' not in sys.modules and 'sftop.tui' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_under_bf16_autocast_no_worse_than_stock(family):
    # HF Trainer's bf16=True wraps the forward in autocast; the patched parts manage dtypes
    # themselves there, and must land as close to the fp32 result as stock autocast does
    ref = tiny_model(family)
    stock, fused = twin(ref), twin(ref)
    K.patch_model(fused)
    batch = _batch("padded", 23)
    r_out, r_grads = _loss_and_grads(ref, batch)
    errs = {}
    for name, m in (("stock", stock), ("fused", fused)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = m(**batch)
        m.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        errs[name] = (rel_err(out.loss, r_out.loss), _all_grads_err(grads, r_grads))
    assert errs["fused"][0] < max(3 * errs["stock"][0], 5e-3), errs
    assert errs["fused"][1] < max(3 * errs["stock"][1], 4e-2), errs
