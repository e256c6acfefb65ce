"""Attention that keeps its output for the checkpoint recomputation (sftop/kernels/kept_attention.py).

CPU: the Function with PyTorch's CPU flash kernels against SDPA in float64 (forward and backward,
GQA, odd lengths), and inside checkpointed layers: the recomputation runs no attention kernel and
the gradients are plain checkpointing's.  The hand-over to host memory is the checkpoint's offload
hooks' job (checkpoint_offload.py); here a stand-in moves the tensor through a copy.  GPU: the
same with cuDNN and the real offload, in a whole patched model.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sftop.kernels as K
import sftop.kernels.kept_attention as ka
from sftop.kernels.recompute import checkpoint_marking_recompute

from _kernel_testutil import rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sdpa(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True, scale=scale
    ).transpose(1, 2)


def _qkv(b, hq, hkv, t, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # HF's layout: [B, T, H, D] in memory, seen as [B, H, T, D]
    mk = lambda h: torch.randn(b, t, h, d, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


@pytest.mark.parametrize("b,hq,hkv,t,d", [(1, 4, 4, 7, 16), (2, 8, 2, 13, 8), (3, 6, 3, 33, 32)])
def test_function_matches_sdpa(b, hq, hkv, t, d):
    q, k, v = _qkv(b, hq, hkv, t, d)
    scale = 0.3
    out = ka.kept_attention(q, k, v, scale)
    ref = _sdpa(q, k, v, scale)
    assert out.shape == (b, t, hq, d) and out.is_contiguous()
    assert rel_err(out, ref) < 1e-10
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


class _CopyingHooks:
    """Stands in for the offload hooks: pack copies the tensor away, unpack copies it back."""

    def __init__(self):
        self.packed = 0

    def pack(self, t, late=False):
        self.packed += 1
        return t.detach().clone()

    def unpack(self, h):
        return h.clone()


def _layer(q_proj, kv_proj, o_proj):
    def layer(x):
        b, t, _ = x.shape
        q = q_proj(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = kv_proj(x).view(b, t, 2, 2, 8).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if ka.applies(torch.nn.Identity(), q, k, None, 0.0, {}):
            out = ka.kept_attention(q, k, v, None)
        else:
            out = _sdpa(q, k, v, None)
        return torch.tanh(o_proj(out.reshape(b, t, -1)))

    return layer


def test_recomputation_reuses_the_kept_output_with_plain_checkpointing_gradients(monkeypatch):
    torch.manual_seed(0)
    projs = [torch.nn.Linear(24, 32).double(), torch.nn.Linear(24, 32).double(), torch.nn.Linear(32, 24).double()]
    layer = _layer(*projs)
    params = [p for m in projs for p in m.parameters()]
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    calls = {"forward": 0}
    real = ka._forward

    def counting(*a):
        calls["forward"] += 1
        return real(*a)

    monkeypatch.setattr(ka, "_forward", counting)
    hooks = _CopyingHooks()
    out = checkpoint_marking_recompute(layer, x, use_reentrant=False, _offload=hooks)
    out2 = checkpoint_marking_recompute(layer, out, use_reentrant=False, _offload=hooks)
    assert calls["forward"] == 2 and hooks.packed == 2
    out2.square().sum().backward()
    # both recomputations took the first runs' outputs back: no third or fourth kernel call
    assert calls["forward"] == 2
    got = [x.grad] + [p.grad for p in params]

    for t in [x, *params]:
        t.grad = None
    monkeypatch.setattr(ka, "_forward", real)
    ref = checkpoint(layer, checkpoint(layer, x, use_reentrant=False), use_reentrant=False)
    ref.square().sum().backward()
    want = [x.grad] + [p.grad for p in params]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_without_offload_nothing_is_kept_and_attention_is_recomputed(monkeypatch):
    torch.manual_seed(0)
    layer = _layer(torch.nn.Linear(24, 32).double(), torch.nn.Linear(24, 32).double(), torch.nn.Linear(32, 24).double())
    x = torch.randn(1, 5, 24, dtype=torch.float64, requires_grad=True)
    calls = []
    monkeypatch.setattr(ka, "_forward", lambda *a: calls.append(1))  # must not be reached
    checkpoint_marking_recompute(layer, x, use_reentrant=False).sum().backward()
    assert calls == []  # SDPA ran, in both runs


@pytest.mark.parametrize(
    "kw,mask,dropout",
    [
        ({"is_causal": False}, None, 0.0),
        ({}, torch.ones(1), 0.0),
        ({}, None, 0.1),
        ({"softcap": 30.0}, None, 0.0),
        ({"sliding_window": 8}, None, 0.0),
    ],
)
def test_only_plain_causal_attention_takes_the_path(kw, mask, dropout):
    q, k, _v = _qkv(1, 4, 2, 5, 8)
    seen = []

    def layer(x):
        seen.append(ka.applies(torch.nn.Identity(), q, k, mask, dropout, kw))
        return torch.sin(x)  # saves its input: the checkpoint recomputes

    x = torch.randn(3, requires_grad=True)
    checkpoint_marking_recompute(layer, x, use_reentrant=False, _offload=_CopyingHooks()).sum().backward()
    assert seen == [False, False]
    checkpoint_marking_recompute(
        lambda x: seen.append(ka.applies(torch.nn.Identity(), q, k, None, 0.0, {})) or torch.sin(x),
        x,
        use_reentrant=False,
        _offload=_CopyingHooks(),
    ).sum().backward()
    assert seen[2:] == [True, True]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("keep_qkv", ["0", "1"])
def test_patched_model_with_offload_skips_the_recomputed_attention_kernel(monkeypatch, keep_qkv):
    import sftop.kernels.lora_linear as ll
    from _tiny_models import bf16_lora_llama

    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")
    monkeypatch.setenv(ka.ENV_SWITCH, keep_qkv)  # this width is below the automatic choice's
    counts = {}
    _count(monkeypatch, ka, "_forward", counts, "attention")
    _count(monkeypatch, ll, "_outputs", counts, "qkv", when=lambda x2, xa, bases, *a: len(bases) == 3)
    ids = torch.randint(0, 1000, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    grads, seen = [], []
    for offload in (True, False):
        m = bf16_lora_llama(hidden=1024, layers=3)
        report = K.patch_model(m)
        assert report.parts["attention"] == "fused"
        assert (report.parts["kept_projections"] == "fused") == (keep_qkv == "1"), report.parts
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
        counts.clear()
        m(input_ids=ids, labels=ids).loss.backward()
        seen.append(dict(counts))
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    # with offload: the three layers' first runs, no recomputation (of q/k/v either, when kept);
    # without: SDPA throughout, and q/k/v projected in both runs
    assert seen == [{"attention": 3, "qkv": 3 if keep_qkv == "1" else 6}, {"qkv": 6}], seen
    for n, g in grads[1].items():
        assert g.abs().sum() > 0, n
        assert rel_err(grads[0][n], g) < 1e-2, (n, rel_err(grads[0][n], g))


# ---------------------------------------------------------------- kept q/k/v (recompute.KeptProjections)


def _offloading_kept_model(family, monkeypatch, keep=True, hooks=None):
    """A tiny patched model on the CPU whose checkpointed layers run as under offloaded lean
    checkpointing (a stand-in for the offload hooks), attention through sftop's interface (on a
    GPU the `attention` part switches it; on the CPU the kept path is the only one it changes)."""
    import functools

    from _tiny_models import tiny_model

    from sftop.kernels.patching import core
    from sftop.kernels.patching.forwards import modules_of
    from sftop.kernels.varlen_attention import NAME, register

    m = tiny_model(family)
    report = K.patch_model(m)
    assert report.parts["attention_lora"] == report.parts["rope"] == report.parts["lean_recompute"] == "fused"
    register()
    base = m.get_base_model()
    base.set_attn_implementation(NAME)
    spec = core.FAMILIES[family]
    for attn in modules_of(base, spec.attention_class):
        attn.q_proj.__dict__["_sftop_qkv"].keep_projections = keep
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hooks is not None:
        fn = functools.partial(
            checkpoint_marking_recompute, _checkpoint=functools.partial(checkpoint, use_reentrant=False), _offload=hooks
        )
        for layer in base.model.layers:
            layer._gradient_checkpointing_func = fn
    return m


def _count(monkeypatch, module, name, counts, key, when=lambda *a, **k: True):
    real = getattr(module, name)

    def counting(*a, **k):
        if when(*a, **k):
            counts[key] = counts.get(key, 0) + 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, counting)


def _grads(m, ids):
    m.zero_grad(set_to_none=True)
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


# the tiny fp32 models below take the kept path through the CPU flash kernels; on a GPU (cuDNN:
# 16-bit only) the bf16 model tests further down cover it
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU kernels' path; GPU tests below")


@cpu_only
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v carry a base bias
def test_recomputation_takes_kept_qkv_back_instead_of_projecting(monkeypatch, family):
    import sftop.kernels.lora_linear as ll
    import sftop.kernels.rope as rope

    counts = {}
    _count(monkeypatch, ll, "_outputs", counts, "qkv", when=lambda x2, xa, bases, *a: len(bases) == 3)
    _count(monkeypatch, rope, "_launch", counts, "rope_forward", when=lambda *a, backward: not backward)
    _count(monkeypatch, ka, "_forward", counts, "attention")
    ids = torch.randint(3, 301, (2, 19), generator=torch.Generator().manual_seed(1))
    results = {}
    for keep in (True, False):
        hooks = _CopyingHooks()
        m = _offloading_kept_model(family, monkeypatch, keep=keep, hooks=hooks)
        counts.clear()
        results[keep] = _grads(m, ids)
        # 2 layers: with q/k/v kept, only the first runs project and rotate; the recomputations
        # take q/k/v (3 more offloaded tensors a layer) back with the attention output
        assert counts == (
            {"qkv": 2, "rope_forward": 2, "attention": 2} if keep else {"qkv": 4, "rope_forward": 4, "attention": 2}
        ), (keep, counts)
        assert hooks.packed == (2 * 4 if keep else 2 * 1)
    stock = _offloading_kept_model(family, monkeypatch, keep=False, hooks=None)  # plain checkpointing
    results["plain"] = _grads(stock, ids)
    for other in (False, "plain"):
        assert abs(results[True][0] - results[other][0]) < 1e-6
        for n, g in results[other][1].items():
            assert g.abs().sum() > 0, n
            assert rel_err(results[True][1][n], g) < 1e-5, (other, n)


@cpu_only
def test_something_computing_on_the_placeholders_is_refused(monkeypatch):
    # Qwen3 normalises q and k (q_norm/k_norm) before RoPE, so its patch never keeps q/k/v; forced
    # on, the recomputation's norm would compute on the placeholders, and attention must refuse
    # those inputs rather than return gradients from them
    m = _offloading_kept_model("qwen3", monkeypatch, keep=True, hooks=_CopyingHooks())
    ids = torch.randint(3, 301, (1, 9), generator=torch.Generator().manual_seed(2))
    loss = m(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="placeholders"):
        loss.backward()


@cpu_only
def test_q_k_v_computed_on_placeholders_are_refused_even_laid_out_like_them(monkeypatch):
    # a step between the projections and attention that computes on the placeholders but keeps
    # their all-zero strides (a broadcast of one computed element): known by stride pattern it
    # would pass for a placeholder, and the backward would run on the first run's q/k/v while
    # the gradients flowed through a computation it never saw
    from sftop.kernels.recompute import KeptProjections, placeholder

    def computed_like_a_placeholder(shape, dtype, device):
        return (placeholder(shape, dtype, device).reshape(-1)[:1] * 1.0).expand(shape)

    monkeypatch.setattr(KeptProjections, "placeholder", staticmethod(computed_like_a_placeholder))
    m = _offloading_kept_model("llama", monkeypatch, keep=True, hooks=_CopyingHooks())
    ids = torch.randint(3, 301, (1, 9), generator=torch.Generator().manual_seed(4))
    loss = m(input_ids=ids, labels=ids).loss
    with pytest.raises(
        RuntimeError, match="attention got computed q/k/v where the recomputation handed on placeholders"
    ):
        loss.backward()


@pytest.mark.gpu
@needs_gpu
def test_q_k_v_computed_on_placeholders_are_refused_on_the_gpu(monkeypatch):
    # the test above through cuDNN and the real offload, in a whole patched bf16 model
    from _tiny_models import bf16_lora_llama

    from sftop.kernels.recompute import KeptProjections, placeholder

    def computed_like_a_placeholder(shape, dtype, device):
        return (placeholder(shape, dtype, device).reshape(-1)[:1] * 1.0).expand(shape)

    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")
    monkeypatch.setenv(ka.ENV_SWITCH, "1")
    m = bf16_lora_llama(hidden=1024, layers=2)
    assert K.patch_model(m).parts["kept_projections"] == "fused"
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    monkeypatch.setattr(KeptProjections, "placeholder", staticmethod(computed_like_a_placeholder))
    ids = torch.randint(0, 1000, (1, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    loss = m(input_ids=ids, labels=ids).loss
    with pytest.raises(
        RuntimeError, match="attention got computed q/k/v where the recomputation handed on placeholders"
    ):
        loss.backward()


def test_placeholders_are_known_by_their_storage_not_their_strides():
    from sftop.kernels.recompute import is_placeholder, placeholder

    p = placeholder((2, 5, 12), torch.float32, "cpu")
    # views of a placeholder (the attention's [B, H, T, D] layout) are still placeholders
    assert is_placeholder(p.view(2, 5, 3, 4).transpose(1, 2)) and is_placeholder(p.reshape(10, 12))
    # computed from one, however it is laid out, is not
    computed = (p.reshape(-1)[:1] * 1.0).expand(2, 5, 12)
    assert computed.stride() == (0, 0, 0) and not is_placeholder(computed)
    assert not is_placeholder(p + 0) and not is_placeholder(p.contiguous())
    # a real broadcast with every stride 0 (even of a NaN) is data, not a placeholder
    assert not is_placeholder(torch.full((1,), float("nan")).expand(2, 5, 12))
    # a placeholder of one element is still one, and each dtype has its own
    one = placeholder((1, 1, 1), torch.float64, torch.device("cpu"))
    assert is_placeholder(one) and is_placeholder(one.view(1, 1, 1, 1))
    assert one.dtype == torch.float64 and not is_placeholder(one.to(torch.float32))


@needs_gpu
@pytest.mark.gpu
def test_placeholders_on_the_gpu_are_known_whichever_way_the_device_is_named():
    from sftop.kernels.recompute import is_placeholder, placeholder

    for device in ("cuda", torch.device("cuda", torch.cuda.current_device())):
        p = placeholder((3, 4, 8), torch.bfloat16, device)
        assert p.is_cuda and is_placeholder(p) and is_placeholder(p.transpose(0, 1))
        assert not is_placeholder(p * 1) and not is_placeholder(torch.zeros(1, device="cuda").expand(3, 4, 8))


def test_placeholders_hold_one_nan_and_the_right_metadata():
    from sftop.kernels.recompute import is_placeholder, placeholder

    p = placeholder((2, 5, 12), torch.bfloat16, torch.device("cpu"))
    assert p.shape == (2, 5, 12) and p.dtype == torch.bfloat16 and p.stride() == (0, 0, 0)
    assert is_placeholder(p) and is_placeholder(p.view(2, 5, 3, 4).transpose(1, 2))
    assert torch.isnan(p.float() * 0).all()  # whatever reads it is poisoned
    assert not is_placeholder(torch.zeros(2, 5, 12)) and not is_placeholder(torch.zeros(1).expand(1))


def test_kept_projections_part_decides_by_family_and_layer_width(monkeypatch):
    from _tiny_models import tiny_model

    from sftop.kernels.constants import projections_worth_keeping

    monkeypatch.delenv(ka.ENV_SWITCH, raising=False)
    # Llama-3.1-8B's layer has compute to hide q/k/v's copies; Llama-3.2-1B's and Qwen2.5-1.5B's do not
    assert projections_worth_keeping(4096, 14336, 4096, 1024)
    assert not projections_worth_keeping(2048, 8192, 2048, 512)
    assert not projections_worth_keeping(1536, 8960, 1536, 256)
    assert K.patch_model(tiny_model("llama")).parts["kept_projections"].startswith("stock: layers too narrow")
    assert K.patch_model(tiny_model("qwen3")).parts["kept_projections"].startswith("stock: qwen3 normalises q and k")
    monkeypatch.setenv(ka.ENV_SWITCH, "1")
    assert projections_worth_keeping(2048, 8192, 2048, 512)
    expected = "fused" if torch.cuda.is_available() else "stock: needs checkpoint_offload"
    assert K.patch_model(tiny_model("llama")).parts["kept_projections"] == expected
    monkeypatch.setenv(ka.ENV_SWITCH, "0")
    assert not projections_worth_keeping(4096, 14336, 4096, 1024)
    monkeypatch.setenv(ka.ENV_SWITCH, "off")  # every switch reads the same words (sftop/kernels/env.py)
    assert not projections_worth_keeping(4096, 14336, 4096, 1024)


@pytest.mark.gpu
@needs_gpu
def test_graphed_steps_keep_qkv_like_eager_plain_checkpointing(monkeypatch):
    from _tiny_models import bf16_lora_llama

    monkeypatch.setenv(ka.ENV_SWITCH, "1")
    gen = torch.Generator("cuda").manual_seed(5)
    batches = [torch.randint(0, 1000, (2, 1024), device="cuda", generator=gen) for _ in range(3)]
    runs = {}
    for graphs, offload in (("0", False), ("1", True)):
        monkeypatch.setenv("SFTOP_CUDA_GRAPHS", graphs)
        m = bf16_lora_llama(hidden=1024, layers=3)
        report = K.patch_model(m)
        assert report.parts["cuda_graphs"] == ("fused" if graphs == "1" else "stock: turned off by SFTOP_CUDA_GRAPHS=0")
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
        params = [p for p in m.parameters() if p.requires_grad]
        runs[graphs] = []
        for ids in batches:  # warm-up, capture, replay
            m.zero_grad(set_to_none=True)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            runs[graphs].append((loss.item(), [p.grad.float().clone() for p in params]))
        if graphs == "1":
            stats = m.get_base_model().__dict__["_sftop_graphs"].stats
            assert (stats.eager_calls, stats.captures, stats.replays) == (1, 1, 2), stats
        del m
    for (l_eager, g_eager), (l_graph, g_graph) in zip(runs["0"], runs["1"]):
        assert abs(l_eager - l_graph) < 1e-2 * abs(l_eager)
        for a, b in zip(g_graph, g_eager):
            assert rel_err(a, b) < 2e-2
