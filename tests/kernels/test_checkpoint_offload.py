"""Offloaded checkpointing with overlapped copies (sftop/kernels/checkpoint_offload.py).

The GPU tests check what matters: gradients equal those of checkpointing without offload, the
layer inputs really leave the GPU (memory held between forward and backward falls by about one
layer input per layer), and a patched model's `gradient_checkpointing_enable(offload=True)` --
what Trainer calls for an "offload" plan -- installs it.
"""

import weakref

import pytest
import torch
from _kernel_testutil import rel_err
from _tiny_models import bf16_lora_llama, tiny_model, twin

import sftop.kernels as K
from sftop.kernels import checkpoint_offload as co

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_reentrant_checkpointing_is_refused():
    with pytest.raises(ValueError, match="use_reentrant=False"):
        co.checkpoint_function({"use_reentrant": True})


def test_small_and_host_tensors_stay_where_they_are():
    hooks = co.OverlappedOffload(min_bytes=1 << 20)
    t = torch.randn(4, 4)
    assert hooks._pack(t) is t and hooks._unpack(t) is t


def test_patch_reports_why_offload_stays_stock_without_a_gpu(monkeypatch):
    m = tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the answer of a machine without one
    report = K.patch_model(m)
    assert report.parts["checkpoint_offload"] == "stock: offloading to host memory needs a CUDA GPU"
    # transformers' own (blocking) offload still applies, under the lean recomputation's marking
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    fn = m.get_base_model().model.layers[0]._gradient_checkpointing_func
    assert fn.keywords["_checkpoint"].func.__module__ == "transformers.modeling_utils"


def _blocks(width, n, seed=0):
    torch.manual_seed(seed)
    return (
        torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(n))
        .cuda()
        .to(torch.bfloat16)
    )


def _run(blocks, x, ckpt):
    """Memory forward leaves for backward (beyond what existed before it), then backward."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    h = x
    for b in blocks:
        h = h + ckpt(b, h)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    h.float().square().mean().backward()
    torch.cuda.synchronize()
    return held


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("prefetch", [True, False])
def test_gradients_match_plain_checkpointing_and_inputs_leave_the_gpu(prefetch):
    from torch.utils.checkpoint import checkpoint

    width, tokens, n = 1024, 4096, 8
    blocks = _blocks(width, n)
    x0 = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    grads = []
    held = []
    for ckpt in (
        lambda f, h: checkpoint(f, h, use_reentrant=False),
        co.checkpoint_function({"use_reentrant": False}, prefetch=prefetch),
    ):
        blocks.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        held.append(_run(blocks, x, ckpt))
        grads.append([x.grad.cpu()] + [p.grad.cpu() for p in blocks.parameters()])
    for g_plain, g_off in zip(*grads):
        assert torch.equal(g_plain, g_off)
    layer_input = tokens * width * 2
    # every block's input but the first (x itself, still referenced here) went to host memory
    assert held[0] - held[1] >= 0.9 * (n - 1) * layer_input, (held, layer_input)


@pytest.mark.gpu
@needs_gpu
def test_patched_model_offloads_through_gradient_checkpointing_enable():
    on = bf16_lora_llama(hidden=1024, layers=4)
    off = twin(on)
    results = []
    for m, offload in ((on, False), (off, True)):
        report = K.patch_model(m)
        assert report.parts["checkpoint_offload"] == "fused"
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
        layer = m.get_base_model().model.layers[0]
        inner = layer._gradient_checkpointing_func.keywords["_checkpoint"]  # under lean_recompute's marking
        uses_ours = getattr(inner, "func", None) is co.offloaded_checkpoint
        assert uses_ours == offload
        ids = torch.randint(0, 1000, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = m(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        grads = {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}
        results.append((loss.item(), held, grads))
    (l_on, held_on, g_on), (l_off, held_off, g_off) = results
    assert l_on == l_off
    for name, g in g_on.items():
        assert g.abs().sum() > 0, name
        assert rel_err(g_off[name], g) < 1e-3, name
    # 4 layer inputs of 2 x 1024 x 1024 bf16 (4 MiB each); the first is the embedding output,
    # which the embedding's own backward keeps anyway
    assert held_on - held_off >= 0.9 * 3 * (4 << 20), (held_on, held_off)


def test_a_capture_takes_the_reserved_host_buffers_in_order():
    a, b = torch.empty(2, 3), torch.empty(4, dtype=torch.bfloat16)
    with co.offloading_into([a, b]):
        assert co._PLAN.buffer_for(torch.ones(2, 3)) is a
        assert co._PLAN.buffer_for(torch.ones(4, dtype=torch.bfloat16)) is b
        with pytest.raises(RuntimeError, match="more tensors than its warm-up"):
            co._PLAN.buffer_for(torch.ones(4))
    assert co._PLAN.reserved is None
    with pytest.raises(RuntimeError, match="other tensors than its warm-up"):
        with co.offloading_into([a]):
            co._PLAN.buffer_for(torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="fewer tensors than its warm-up"):
        with co.offloading_into([a, b]):
            co._PLAN.buffer_for(torch.ones(2, 3))


def test_fetch_ahead_targets_the_newest_unused_entry():
    entries = []
    for _ in range(4):
        prev = weakref.ref(entries[-1]) if entries else None
        entries.append(co._Offloaded(None, "cpu", None, prev))
    a, b, c, d = entries
    assert co.OverlappedOffload._next_wanted(d) is c
    d.used = True
    c.used = True
    assert co.OverlappedOffload._next_wanted(c) is b
    # an entry backward has already used is never fetched again (its copy would be left dangling)
    b.used = True
    assert co.OverlappedOffload._next_wanted(d) is a
    a.fetched = object()  # already on its way
    assert co.OverlappedOffload._next_wanted(d) is None
    a.fetched = None
    a.used = True
    assert co.OverlappedOffload._next_wanted(d) is None
    # a layer that offloads a kept tensor too has two entries: with the newer one on its way, the
    # one behind it is fetched next, so the layer's input is never copied on demand
    x = co._Offloaded(None, "cpu", None, None)
    y = co._Offloaded(None, "cpu", None, weakref.ref(x))
    z = co._Offloaded(None, "cpu", None, weakref.ref(y))
    y.fetched = object()
    assert co.OverlappedOffload._next_wanted(z) is x
    y.fetched = None  # (a real fetch would be a GPU tensor its __del__ hands back)


def test_late_entries_wait_for_the_mlp_backward_while_input_and_output_come_ahead():
    # two layers saved as input, kept q/k/v (late) and attention output, in that order
    hooks, entries = co.OverlappedOffload(), []
    for _layer in range(2):
        for name in ("x", "q", "k", "v", "o"):
            prev = weakref.ref(entries[-1][1]) if entries else None
            entries.append((name, co._Offloaded(None, "cpu", None, prev, late=name in "qkv")))
    names = {id(e): n + str(i // 5) for i, (n, e) in enumerate(entries)}
    # the later layer's recomputation unpacks its five entries in the order they were saved
    fetched_now = []
    for _name, e in entries[5:]:
        e.used = True
        ahead = hooks._ahead_now(e)
        if ahead is not None:
            fetched_now.append(names[id(ahead)])
            ahead.fetched = object()
    assert fetched_now == ["o0", "x0"]
    assert [names[id(e)] for e in hooks._deferred] == ["v0", "k0", "q0"]
    for _name, e in entries:
        e.fetched = None


@pytest.mark.gpu
@needs_gpu
def test_shared_constants_stay_and_gradients_match_with_them():
    # every block is handed the same large tensor that needs no gradient (as rotary tables are)
    from torch.utils.checkpoint import checkpoint

    width, tokens, n = 1024, 4096, 6
    blocks = _blocks(width, n)
    shared = torch.rand(tokens, width, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    grads, held = [], []
    offloaded = co.checkpoint_function({"use_reentrant": False})
    for ckpt in (
        lambda f, h: checkpoint(f, h, shared, use_reentrant=False),
        lambda f, h: offloaded(f, h, shared),
    ):
        blocks.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        held.append(_run(blocks, x, lambda b, h, ckpt=ckpt: ckpt(lambda a, s: b(a) * s, h)))
        grads.append([x.grad.cpu()] + [p.grad.cpu() for p in blocks.parameters()])
    for g_plain, g_off in zip(*grads):
        assert torch.equal(g_plain, g_off)
    assert held[0] - held[1] >= 0.9 * (n - 1) * tokens * width * 2, held
