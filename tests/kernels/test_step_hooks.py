"""The ops hold no scheduling state: the patcher hands the RMSNorm backward its offload hook, RoPE
on a recomputation's placeholders is the recompute machinery's, and a CUDA graph capture freezes
scratch buffers without knowing which op holds them."""

import ast
import pathlib
import types

import pytest
import torch

from sftop.kernels import nf4, scratch
from sftop.kernels.patching.parts import rms_norm as rms_part
from sftop.kernels.recompute import is_placeholder, placeholder, rope_on_placeholders
from sftop.kernels.rms_norm import rms_norm
from sftop.kernels.rope import apply_rope

from _kernel_testutil import rel_err
from _tiny_models import DEVICE

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "sftop" / "kernels"
SCHEDULING = {"recompute", "checkpoint_offload", "cuda_graphs", "kept_attention", "patching"}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "op",
    [
        "rms_norm",
        "rope",
        "nf4",
        "glu",
        "fused_linear_cross_entropy",
        "fused_linear_logprob",
        "scratch",
        "lora_mlp",
        "lora_linear",
    ],
)
def test_op_files_import_no_scheduling_module(op):
    imported = set()
    for node in ast.walk(ast.parse((KERNELS / f"{op}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    assert imported & SCHEDULING == set()


def test_the_layer_run_says_first_run_or_recomputation_only_inside_a_marked_checkpoint():
    from sftop.kernels.recompute import checkpoint_marking_recompute, current_layer_run

    seen = []

    def layer(x):
        run = current_layer_run()
        seen.append(None if run is None else run.recomputing)
        if run is not None and not run.recomputing:
            run.keep(x * 3)
        kept = run.kept() if run is not None and run.recomputing else None
        seen.append(None if kept is None else float(kept.sum()))
        return torch.sigmoid(x) * 2

    assert current_layer_run() is None
    x = torch.ones(4, requires_grad=True)
    checkpoint_marking_recompute(layer, x, use_reentrant=False).sum().backward()
    # first run (keeps 3 * x), then the recomputation, which reads it back
    assert seen == [False, None, True, 12.0]
    assert current_layer_run() is None


def test_rms_norm_calls_its_hook_once_as_backward_starts():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 24, generator=g, device="cpu").to(DEVICE).requires_grad_()
    w = torch.randn(24, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(3, 7, 24, generator=g).to(DEVICE)
    seen = []
    y = rms_norm(x, w, 1e-6, False, None, lambda d: seen.append(d.shape))
    assert seen == []  # not in forward
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    assert seen == [torch.Size([3, 7, 24])]
    y2 = rms_norm(x, w, 1e-6)
    gx2, gw2 = torch.autograd.grad(y2, (x, w), dy)
    assert torch.equal(y, y2) and torch.equal(gx, gx2) and torch.equal(gw, gw2)


def test_the_patched_norm_fetches_deferred_offloads_only_for_gpu_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(rms_part, "fetch_deferred", lambda: calls.append(1))
    rms_part.before_backward(types.SimpleNamespace(is_cuda=False))
    assert calls == []
    rms_part.before_backward(types.SimpleNamespace(is_cuda=True))
    assert calls == [1]


class _HandOnPlaceholder(torch.autograd.Function):
    """What the q/k/v projections do in a recomputation: a placeholder out, the gradient through."""

    @staticmethod
    def forward(ctx, x):
        return placeholder(x.shape, x.dtype, x.device)

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_on_placeholders_hands_them_on_with_ropes_own_backward(unsqueeze_dim):
    g = torch.Generator().manual_seed(5)
    b, hq, hk, t, d = 2, 4, 2, 9, 16
    shape_q, shape_k = ((b, hq, t, d), (b, hk, t, d)) if unsqueeze_dim == 1 else ((b, t, hq, d), (b, t, hk, d))
    q = torch.randn(*shape_q, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(*shape_k, generator=g).to(DEVICE).requires_grad_()
    cos, sin = torch.randn(1, t, d, generator=g).to(DEVICE), torch.randn(1, t, d, generator=g).to(DEVICE)
    gq, gk = torch.randn(*shape_q, generator=g).to(DEVICE), torch.randn(*shape_k, generator=g).to(DEVICE)
    qo, ko = apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    want = torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    # the recomputation's projections hand on placeholders that carry their autograd history
    pq, pk = _HandOnPlaceholder.apply(q), _HandOnPlaceholder.apply(k)
    assert is_placeholder(pq) and is_placeholder(pk)
    po, pko = rope_on_placeholders(pq, pk, cos, sin, unsqueeze_dim)
    assert is_placeholder(po) and is_placeholder(pko)
    assert po.shape == qo.shape and pko.shape == ko.shape
    got = torch.autograd.grad((po, pko), (q, k), (gq, gk))
    for a, w in zip(got, want):
        assert rel_err(a, w) < 1e-6


def test_freeze_all_freezes_every_scratch_buffer_set(monkeypatch):
    for buffers in (nf4.SCRATCH, nf4.ABSMAX_SCRATCH):
        monkeypatch.setattr(buffers, "_frozen", False)  # put back as it was after the test
    own = scratch.ScratchBuffers()
    first = own.get(torch.device("cpu"), torch.float32, 4)
    scratch.freeze_all()
    assert nf4.SCRATCH._frozen and nf4.ABSMAX_SCRATCH._frozen
    own.get(torch.device("cpu"), torch.float32, 64)  # outgrown: kept, not freed
    assert own.kept_nbytes() == first.numel() * 4
    own.clear()
    assert own.nbytes() == 64 * 4


@pytest.mark.gpu
@needs_gpu
def test_a_capture_freezes_the_nf4_scratch(monkeypatch):
    import sftop.kernels as K
    from transformers import BitsAndBytesConfig

    from _tiny_models import tiny_model

    for buffers in (nf4.SCRATCH, nf4.ABSMAX_SCRATCH):
        monkeypatch.setattr(buffers, "_frozen", False)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    m = tiny_model("llama", dtype=torch.bfloat16, quant=q)
    assert K.patch_model(m).parts["cuda_graphs"] == "fused"
    m.train()
    ids = torch.randint(3, 301, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for _ in range(2):  # the second sighting of the shape is captured
        m(input_ids=ids, labels=ids).loss.backward()
    assert m.get_base_model().__dict__["_sftop_graphs"].stats.captures == 1
    assert nf4.SCRATCH._frozen and nf4.ABSMAX_SCRATCH._frozen


@pytest.mark.gpu
@needs_gpu
def test_offloaded_kept_qkv_are_fetched_from_the_norm_backward(monkeypatch):
    import sftop.kernels as K

    from _tiny_models import bf16_lora_llama

    monkeypatch.setenv("SFTOP_CUDA_GRAPHS", "0")
    monkeypatch.setenv("SFTOP_KEEP_PROJECTIONS", "1")
    calls = []
    real = rms_part.fetch_deferred
    monkeypatch.setattr(rms_part, "fetch_deferred", lambda: (calls.append(1), real()))
    m = bf16_lora_llama(hidden=1024, layers=3)
    assert K.patch_model(m).parts["kept_projections"] == "fused"
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    ids = torch.randint(0, 1000, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    m(input_ids=ids, labels=ids).loss.backward()
    # two norms a layer and the final one, each backward once
    assert len(calls) == 2 * 3 + 1
