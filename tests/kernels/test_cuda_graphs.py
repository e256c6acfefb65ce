"""The training step replayed from CUDA graphs (sftop/kernels/cuda_graphs.py, patch part cuda_graphs).

CPU tests: the part's refusals, the one-forward-one-backward bookkeeping, and the fused loss's
capture-safe mode (every row through the kernel) against its usual row selection.  GPU tests: a
graphed patched model trains exactly like the same patched model run eagerly (losses and LoRA
gradients over several optimizer steps, with gradient accumulation, bf16 and NF4), captures only a
shape it sees twice (offloaded checkpoints included), runs padded batches eagerly, and refuses a stale
backward.
"""

import types

import pytest
import torch
from _kernel_testutil import DEVICE, rel_err
from _tiny_models import bf16_lora_llama, tiny_model, twin

import sftop.kernels as K
from sftop.kernels import cuda_graphs as cg
from sftop.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from sftop.kernels.patching import markers as M

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_patch_reports_why_graphs_stay_stock_without_a_gpu(monkeypatch):
    m = tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the answer of a machine without one
    report = K.patch_model(m)
    assert report.parts["loss"] == "fused"
    assert report.parts["cuda_graphs"] == "stock: CUDA graphs need a CUDA GPU"


def test_environment_switch_turns_graphs_off(monkeypatch):
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    m = tiny_model("llama")
    assert K.patch_model(m).parts["cuda_graphs"] == f"stock: turned off by {cg.ENV_SWITCH}=0"
    assert "_sftop_graphs" not in m.get_base_model().__dict__


def test_dropout_keeps_graphs_off(monkeypatch):
    from sftop.kernels.patching.parts import cuda_graphs, loss
    from sftop.kernels.patching.registry import FAMILIES

    spec = FAMILIES["llama"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the check past the GPU one
    m = tiny_model("llama", lora_dropout=0.1)
    base = m.get_base_model()
    loss.apply(base, spec)
    assert cuda_graphs.apply(base, spec) == (
        "stock: dropout p=0.1 in Dropout (a replayed graph would reuse one random mask)"
    )
    m = tiny_model("llama")
    base = m.get_base_model()
    base.config.attention_dropout = 0.2
    loss.apply(base, spec)
    assert cuda_graphs.apply(base, spec).startswith("stock: attention_dropout=0.2")


def test_backward_must_follow_its_own_forward():
    graphs = cg.StepGraphs()
    a, b = object(), object()
    gen_a = graphs.arm(a)
    graphs.take_armed(a, gen_a)  # forward, backward: fine
    with pytest.raises(cg.StaleGraphBackward, match="two training forwards"):
        graphs.take_armed(a, gen_a)  # backward twice
    gen_a = graphs.arm(a)
    graphs.arm(b)  # a second forward overwrote the first one's activations
    with pytest.raises(cg.StaleGraphBackward):
        graphs.take_armed(a, gen_a)
    gen_a2 = graphs.arm(a)  # the same graph forwarded again: only the newest forward may go back
    with pytest.raises(cg.StaleGraphBackward):
        graphs.take_armed(a, gen_a)
    graphs.take_armed(a, gen_a2)


class _Recorded:
    """Stands in for a torch.cuda.CUDAGraph: replaying runs the recorded work on the static buffers."""

    def __init__(self, work):
        self.replay = work


def _fake_step(w, backward):
    """A captured step of y = x * w with the metric x + 1, over static buffers as a capture leaves them."""
    step = object.__new__(cg.CapturedStep)
    step.n_inputs, step.backward = 1, backward
    step.static_inputs = [torch.zeros(5)]
    step.outputs = [torch.zeros(5), torch.zeros(5)]
    step.loss = step.outputs[0]
    step.grad_out = torch.ones(5)
    step.grads = [torch.zeros(5)] if backward else []
    step.grad_ptrs = {g.data_ptr() for g in step.grads}
    x = step.static_inputs[0]

    def forward():
        step.outputs[0].copy_(x * w.detach())
        step.outputs[1].copy_(x + 1)

    def grads():
        step.grads[0].copy_(step.grad_out * x)

    step.fwd = _Recorded(forward)
    step.bwd = _Recorded(grads) if backward else None
    return step


def test_replay_hands_out_a_vector_output_and_metrics_and_takes_the_vectors_gradient():
    """The generalised replay (vector output + metrics, the incoming gradient copied in) and the
    forward-only one, with the graphs replaced by recorded work."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(5))
    slots = [(module, "w", module.w)]
    graphs = cg.StepGraphs()
    graphs._steps["train"] = _fake_step(module.w, backward=True)
    graphs._grad_ptrs |= graphs._steps["train"].grad_ptrs
    graphs._steps["forward"] = _fake_step(module.w, backward=False)
    x = torch.randn(5)
    y, metric = graphs.replay("train", None, (x,), slots)
    assert torch.equal(y, x * module.w.detach()) and torch.equal(metric, x + 1)
    assert y.requires_grad and not metric.requires_grad
    g = torch.randn(5)
    (y * g).sum().backward()
    assert torch.equal(module.w.grad, g * x)  # the upstream vector reached the captured backward
    assert module.w.grad.data_ptr() in graphs._grad_ptrs  # handed out without a copy
    with torch.no_grad():
        y2, metric2 = graphs.replay("forward", None, (2 * x,), slots, backward=False)
    assert torch.equal(y2, 2 * x * module.w.detach()) and torch.equal(metric2, 2 * x + 1)
    y2.add_(1)  # the caller's own copies: the static outputs stay as replayed
    assert torch.equal(graphs._steps["forward"].outputs[0], 2 * x * module.w.detach())
    assert graphs.stats.replays == 2
    with pytest.raises(ValueError, match="captured with backward=False"):
        graphs.replay("forward", None, (x,), slots)


def test_replay_hands_the_inputs_gradient_on_as_a_copy():
    """An input named in grad_inputs (embeddings an image tower wrote into) gets its gradient from the
    captured backward, as a copy: the static buffer belongs to the next replay."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(5))
    slots = [(module, "w", module.w)]
    graphs = cg.StepGraphs()
    step = _fake_step(module.w, backward=True)
    step.grad_inputs, step.input_grads = (0,), [torch.zeros(5)]
    real_bwd = step.bwd.replay

    def backward():
        real_bwd()
        step.input_grads[0].copy_(step.grad_out * module.w.detach())

    step.bwd = _Recorded(backward)
    graphs._steps["train"] = step
    before = torch.randn(5, requires_grad=True)
    x = before * 2  # eager work ahead of the captured step
    y, _metric = graphs.replay("train", None, (x,), slots, grad_inputs=(0,))
    g = torch.randn(5)
    (y * g).sum().backward()
    assert torch.equal(before.grad, 2 * g * module.w.detach())  # through the step into the eager work
    assert torch.equal(module.w.grad, g * x.detach())
    step.input_grads[0].fill_(float("nan"))  # the next replay's
    assert torch.isfinite(before.grad).all()
    with pytest.raises(ValueError, match=r"grad_inputs=\(0,\)"):
        graphs.replay("train", None, (x,), slots)  # the same key without the input's gradient


def test_forward_only_replays_share_the_pool_safely():
    """Forward-only graphs share the training graphs' pool: one replayed while a training forward
    waits for its backward runs eagerly instead (its transients could overwrite the saved
    activations), and one replayed after it first moves a .grad still over a static gradient
    (gradient accumulation) into a copy of its own, as a training replay does."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(5))
    slots = [(module, "w", module.w)]
    graphs = cg.StepGraphs()
    train, forward = _fake_step(module.w, backward=True), _fake_step(module.w, backward=False)
    graphs._steps.update(train=train, forward=forward)
    graphs._grad_ptrs |= train.grad_ptrs
    graphs._trained[id(module.w)] = module.w
    x = torch.randn(5)
    y, _metric = graphs.replay("train", None, (x,), slots)
    with torch.no_grad():
        assert graphs.replay("forward", None, (x,), slots, backward=False) is None  # armed: eager
    assert (graphs.stats.eager_calls, graphs.stats.replays) == (1, 1)
    y.sum().backward()
    static = train.grads[0]
    assert module.w.grad.data_ptr() == static.data_ptr()
    want = module.w.grad.clone()
    with torch.no_grad():
        out = graphs.replay("forward", None, (x,), slots, backward=False)
    assert out is not None and graphs.stats.replays == 2
    assert module.w.grad.data_ptr() != static.data_ptr() and torch.equal(module.w.grad, want)
    static.fill_(float("nan"))  # what a later replay in the shared pool may leave there
    assert torch.equal(module.w.grad, want)


def _fake_captures(monkeypatch):
    """Captures made as `_fake_step`s of one parameter: the list of their `backward` flags, and the
    parameter's slots."""
    captured = []

    def capture(self, fn, inputs, slots, backward=True, grad_inputs=()):
        captured.append(backward)
        return _fake_step(slots[0][2], backward), None

    monkeypatch.setattr(cg.StepGraphs, "_capture", capture)
    monkeypatch.setattr(cg, "_room_for_capture", lambda static_bytes=0: None)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(5))
    return captured, [(module, "w", module.w)]


def test_a_forward_only_step_is_captured_after_the_training_step(monkeypatch):
    """Both seen twice: the training step is captured then, the forward-only one (into the blocks the
    training step freed) one sighting later, once a training step is captured."""
    captured, slots = _fake_captures(monkeypatch)
    graphs = cg.StepGraphs()
    x = torch.randn(5)
    for _ in range(3):
        with torch.no_grad():
            graphs.replay("reference", None, (x,), slots, backward=False)
        out = graphs.replay("policy", None, (x,), slots)
        if out is not None:
            out[0].sum().backward()
    assert captured == [True, False]  # the policy's on the second step, the reference's on the third
    assert (graphs.stats.eager_calls, graphs.stats.replays) == (3, 3)
    alone = cg.StepGraphs()  # no training step at all: the forward-only one on its third sighting
    for _ in range(3):
        with torch.no_grad():
            alone.replay("reference", None, (x,), slots, backward=False)
    assert captured == [True, False, False] and alone.stats.eager_calls == 2


def test_forward_only_warm_up_allocates_from_the_pool_and_gives_its_reference_back(monkeypatch):
    calls = []
    for name in cg._POOL_HOOKS:
        monkeypatch.setattr(torch._C, name, lambda device, pool, _n=name: calls.append((_n, pool)), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with cg._allocating_into((7, 0)):
        calls.append("warm-up")
    assert calls == [
        ("_cuda_beginAllocateCurrentThreadToPool", (7, 0)),
        "warm-up",
        ("_cuda_endAllocateToPool", (7, 0)),
        ("_cuda_releasePool", (7, 0)),
    ]
    calls.clear()
    with cg._allocating_into(None):  # no pool to use: the ordinary cache
        calls.append("warm-up")
    assert calls == ["warm-up"]
    monkeypatch.delattr(torch._C, "_cuda_releasePool")  # a torch without the hooks: as before
    with cg._allocating_into((7, 0)):
        calls.append("warm-up")
    assert calls == ["warm-up", "warm-up"]


@pytest.mark.parametrize("n,hid,vocab,num_items", [(29, 32, 300, None), (17, 24, 257, 40)])
def test_loss_without_row_selection_matches_with_it(poison, n, hid, vocab, num_items):
    """The capture-safe mode sends ignored rows through the kernel: they must add nothing."""
    h = torch.randn(n, hid, device=DEVICE, requires_grad=True)
    w = torch.randn(vocab, hid, device=DEVICE) / hid**0.5
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[torch.rand(n, device=DEVICE) < 0.4] = -100
    y[1] = -100
    out = []
    for select in (True, False):
        loss = fused_linear_cross_entropy(h, w, y, num_items_in_batch=num_items, select_rows=select)
        (g,) = torch.autograd.grad(loss * 1.7, h)
        out.append((loss, g))
    (l_sel, g_sel), (l_all, g_all) = out
    assert rel_err(l_all, l_sel) < 1e-6
    assert rel_err(g_all, g_sel) < 1e-6
    assert torch.count_nonzero(g_all[y == -100]) == 0


# ----------------------------------------------------------------------------------------- GPU


def _llama(quant=None, seed=0):
    from transformers import BitsAndBytesConfig

    q = None
    if quant == "nf4":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return tiny_model("llama", seed=seed, dtype=torch.bfloat16, quant=q)


def _train(model, batches, accumulate=2, checkpointing=True, offload=False):
    """Optimizer steps over `batches` (accumulating `accumulate` micro-batches per step); returns
    every micro-batch's loss and the LoRA gradients of each optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    losses, grads = [], []
    for i, (ids, mask) in enumerate(batches):
        kw = {} if mask is None else {"attention_mask": mask}
        loss = model(input_ids=ids, labels=ids, **kw).loss
        (loss / accumulate).backward()
        losses.append(loss.item())
        if (i + 1) % accumulate == 0:
            grads.append([p.grad.float().clone() for p in params])
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, grads


def _batches(n, shape=(2, 64), seed=1, masks=False):
    gen = torch.Generator("cuda").manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 301, shape, device="cuda", generator=gen)
        out.append((ids, torch.ones_like(ids) if masks else None))
    return out


def _graphs(model):
    return model.get_base_model().__dict__["_sftop_graphs"]


def _compare(eager, graphed, tol):
    (l_e, g_e), (l_g, g_g) = eager, graphed
    assert len(l_e) == len(l_g)
    for a, b in zip(l_e, l_g):
        assert abs(a - b) <= tol * abs(a), (l_e, l_g)
    for step_e, step_g in zip(g_e, g_g):
        for a, b in zip(step_e, step_g):
            assert a.abs().sum() > 0
            assert rel_err(b, a) < tol


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_graphed_training_matches_eager(monkeypatch, quant):
    graphed = _llama(quant)
    eager = twin(graphed) if quant is None else _llama(quant)
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    assert K.patch_model(eager).parts["cuda_graphs"].startswith("stock: turned off")
    monkeypatch.delenv(cg.ENV_SWITCH)
    report = K.patch_model(graphed)
    assert report.parts["cuda_graphs"] == "fused", report.parts
    batches = _batches(8)  # 4 optimizer steps of 2 micro-batches, one shape
    ref = _train(eager, batches)
    got = _train(graphed, batches)
    stats = _graphs(graphed).stats
    # first sighting eager, second captured (and replayed), the rest replayed
    assert (stats.eager_calls, stats.captures, stats.replays) == (1, 1, 7), stats
    _compare(ref, got, tol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_only_repeated_shapes_are_captured_and_padding_runs_eagerly():
    m = _llama()
    K.patch_model(m)
    batches = [(_batches(1, shape=(2, 32 + 8 * i), seed=i)[0]) for i in range(4)]
    _train(m, batches, accumulate=1)
    assert _graphs(m).stats.captures == 0 and _graphs(m).stats.eager_calls == 4
    padded = _batches(4, masks=True)
    for _ids, mask in padded:
        mask[0, -5:] = 0  # right padding on one row
    _train(m, padded, accumulate=1)
    assert _graphs(m).stats.captures == 0
    ones = _batches(3, masks=True, seed=9)
    _train(m, ones, accumulate=1)  # an all-ones mask is no padding: captured on its second sighting
    assert (_graphs(m).stats.captures, _graphs(m).stats.replays) == (1, 2)


def _grads_without_updates(model, batches, offload):
    """Each batch's loss and LoRA gradients at the initial weights.  No optimizer steps: at this
    width attention's backward is not bitwise deterministic (about 1e-2 relative between two eager
    runs), and Adam's sign-like first steps would blow that up into different weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    losses, grads = [], []
    for ids, _mask in batches:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.float().clone() for p in params])
    return losses, grads


def _pool_bytes(graphs) -> int:
    return sum(
        seg["total_size"]
        for seg in torch.cuda.memory_snapshot()
        if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(graphs._pool)
    )


@pytest.mark.gpu
@needs_gpu
def test_offloaded_checkpoints_are_captured_and_keep_layer_inputs_out_of_the_pool():
    layers = 8
    batches = _batches(4, shape=(2, 2048))
    results = {}
    for offload in (False, True):
        # layer inputs of 2 x 2048 tokens x 2048 bf16 (16 MiB): offloaded, and above the size the
        # allocator rounds up to 20 MiB segments (so the pool's size tracks its peak closely)
        m = bf16_lora_llama(hidden=2048, layers=layers)
        K.patch_model(m)
        run = _grads_without_updates(m, batches, offload)
        stats = _graphs(m).stats
        assert (stats.eager_calls, stats.captures, stats.replays) == (1, 1, 3), stats
        results[offload] = run, _pool_bytes(_graphs(m))
        del m, run
        torch.cuda.empty_cache()
    (plain, pool_plain), (moved, pool_moved) = results[False], results[True]
    _compare(plain, moved, tol=2e-2)
    # the pool holds a step's peak; without offload every layer input sits in it from the loss to
    # the last layer's backward, with it one or two (the one being recomputed, the one prefetched)
    layer_input = 2 * 2048 * 2048 * 2
    assert pool_plain - pool_moved >= 3 * layer_input, (pool_plain, pool_moved)


@pytest.mark.gpu
@needs_gpu
def test_gradients_are_the_graphs_own_buffers_until_the_next_replay():
    m = _llama()
    K.patch_model(m)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    ((ids, _),) = _batches(1)
    for _ in range(2):  # eager, then captured
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
    static = _graphs(m)._grad_ptrs
    m.zero_grad(set_to_none=True)
    m(input_ids=ids, labels=ids).loss.backward()  # a replay
    # no copy of the gradients: each .grad lies in the graph's own gradient buffers
    assert len(static) == len(params)
    assert {p.grad.data_ptr() for p in params} == static
    first = [p.grad.float().clone() for p in params]
    # accumulating: the next replay must neither overwrite nor double the first micro-batch's
    m(input_ids=ids, labels=ids).loss.backward()
    assert not {p.grad.data_ptr() for p in params} & static
    for p, g in zip(params, first):
        assert rel_err(p.grad.float(), 2 * g) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_captured_shapes_share_one_set_of_gradient_buffers(monkeypatch):
    """Two captured shapes hand out the very same gradient buffers, and capturing the second one adds
    no gradients to what stays allocated between steps; each shape's gradients are still its own
    (equal to an eager twin's)."""
    m = _llama()
    eager = twin(m)
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    K.patch_model(eager)
    monkeypatch.delenv(cg.ENV_SWITCH)
    K.patch_model(m)
    m.train()
    eager.train()
    params = [p for p in m.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    (short,) = _batches(1, shape=(2, 64))
    (long,) = _batches(1, shape=(2, 96), seed=2)
    between = []
    for ids, _ in (short, short, long, long):  # eager, captured; eager, captured
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        between.append(torch.cuda.memory_allocated())
    graphs = _graphs(m)
    assert graphs.stats.captures == 2, graphs.stats
    assert len(graphs._grad_ptrs) == len(params)  # one set for both captured steps
    # the second capture added no gradients of its own, only its static inputs and outputs (a few
    # hundred bytes each; measured on an H100: 4 KiB, against 29 KiB of gradients)
    assert between[3] - between[2] < grad_bytes / 2, (between, grad_bytes)
    for ids, _ in (short, long):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()  # replays
        assert {p.grad.data_ptr() for p in params} == graphs._grad_ptrs
        eager.zero_grad(set_to_none=True)
        eager(input_ids=ids, labels=ids).loss.backward()
        eager_params = [p for p in eager.parameters() if p.requires_grad]
        for p, q in zip(params, eager_params):
            assert q.grad.abs().sum() > 0
            assert rel_err(p.grad.float(), q.grad.float()) < 2e-2


@pytest.mark.gpu
@needs_gpu
def test_two_forwards_before_backward_raise():
    m = _llama()
    K.patch_model(m)
    m.train()
    ((ids, _),) = _batches(1)
    for _ in range(2):
        m(input_ids=ids, labels=ids).loss.backward()
    first = m(input_ids=ids, labels=ids).loss
    second = m(input_ids=ids, labels=ids).loss
    with pytest.raises(cg.StaleGraphBackward):
        first.backward()
    second.backward()  # the newest forward still goes back
    assert _graphs(m).stats.replays == 3


@pytest.mark.gpu
@needs_gpu
def test_replays_use_no_ordinary_memory_and_the_pool_is_reported():
    m = _llama()
    K.patch_model(m)
    batches = _batches(6, shape=(4, 256))
    _train(m, batches[:3], accumulate=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _train(m, batches[3:], accumulate=1)
    torch.cuda.synchronize()
    # the step's transients live in the graph pool, which the allocator statistics do not see
    # (what idle_pool_bytes is for): only the loss, gradients and optimizer state are allocated
    assert torch.cuda.max_memory_allocated() - before < 4 << 20
    assert cg.idle_pool_bytes() > 4 * 256 * 301 * 2  # at least one step's bf16 logits sat in it


def test_capture_leaves_out_the_causal_mask_of_unpadded_batches_only(monkeypatch):
    """transformers materialises a [B, 1, T, T] mask while a stream captures (slow attention);
    inside causal_masks_skipped a plain causal request gets none, anything else keeps its mask,
    and the registry is as before afterwards."""
    from transformers import AutoConfig
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = "sdpa"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    original = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    emb = torch.zeros(4, 16, 32)
    pos = torch.arange(16)[None]

    def mask(attention_mask):
        return create_causal_mask(
            config=cfg, inputs_embeds=emb, attention_mask=attention_mask, past_key_values=None, position_ids=pos
        )

    ones = torch.ones(4, 16, dtype=torch.long)
    assert mask(ones).shape == (4, 1, 16, 16)  # what capturing without the context costs
    with cg.causal_masks_skipped():
        assert mask(ones) is None
        # without a padding mask transformers looks for packing in the position ids, which it
        # can't do while capturing: that request keeps its mask (the graph path passes ones)
        assert mask(None) is not None
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original
    assert mask(ones).shape == (4, 1, 16, 16)


def _fake_allocator(monkeypatch, *, limit_gib, allocated_gib, peak_gib, reserved_gib):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda *a: limit_gib / 80, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: int(reserved_gib * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: int(allocated_gib * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: int(peak_gib * gib))


def test_capture_needs_room_for_the_steps_own_gradient_buffers_too(monkeypatch):
    # under a 3.0 GiB limit: 2.5 live, a 0.2 GiB transient seen; 0.5 GiB left (reserved = allocated)
    _fake_allocator(monkeypatch, limit_gib=3.0, allocated_gib=2.5, peak_gib=2.7, reserved_gib=2.5)
    assert cg._room_for_capture() is None  # twice 0.2 fits in 0.5
    assert cg._room_for_capture(static_bytes=int(0.05 * 2**30)) is None
    why = cg._room_for_capture(static_bytes=int(0.2 * 2**30))  # 0.4 + 0.2 does not
    assert why is not None and "0.50 GiB free, 0.60 needed" in why
    assert cg._gradient_bytes([(None, "a", torch.nn.Parameter(torch.zeros(10, 4)))]) == 160
    frozen = torch.nn.Parameter(torch.zeros(10, 4), requires_grad=False)
    assert cg._gradient_bytes([(None, "w", frozen)]) == 0


def test_the_first_captures_gradients_become_the_shared_set_and_later_ones_copy_into_it():
    """The bookkeeping of the shared gradient buffers, without a GPU: a parameter without a shared
    buffer keeps the gradient its capture made (no copy, nothing allocated beside it), one with a
    buffer gets the new gradient copied in, a frozen one stays None; only parameters without a
    buffer count as what a capture adds for good."""
    a, b, frozen = (torch.nn.Parameter(torch.zeros(3, 2)) for _ in range(3))
    frozen.requires_grad_(False)
    slots = [(None, "a", a), (None, "b", b), (None, "f", frozen)]
    graphs = cg.StepGraphs()
    assert graphs._shared_grads(slots) == [None, None, None]
    assert graphs._new_gradient_bytes(slots) == 2 * 3 * 2 * 4
    made = (torch.ones(3, 2), torch.full((3, 2), 2.0), None)
    kept = cg._into_shared(made, graphs._shared_grads(slots))
    assert kept[0] is made[0] and kept[1] is made[1] and kept[2] is None
    graphs._grad_buffers.update({id(a): kept[0]})  # as replay registers a capture's gradients
    assert graphs._new_gradient_bytes(slots) == 3 * 2 * 4  # b still lacks one
    later = (torch.full((3, 2), 5.0), torch.full((3, 2), 7.0), None)
    out = cg._into_shared(later, graphs._shared_grads(slots))
    assert out[0] is made[0] and torch.equal(made[0], later[0])  # copied into the shared buffer
    assert out[1] is later[1] and out[2] is None
    # a parameter of another shape under a reused id never gets a buffer that does not fit it
    graphs._grad_buffers[id(b)] = torch.zeros(4)
    assert graphs._shared_grads(slots)[1] is None
    graphs.release()
    assert graphs._grad_buffers == {}


def test_a_capture_out_of_memory_frees_its_attempt_and_stops_further_captures(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (1, 0))
    monkeypatch.setattr(cg, "_room_for_capture", lambda static_bytes=0: None)

    def out_of_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.00 MiB (injected)")

    monkeypatch.setattr(cg, "CapturedStep", out_of_memory)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(5))
    slots = [(module, "w", module.w)]
    graphs = cg.StepGraphs()
    x = torch.randn(5)
    for key in ("a", "a", "b", "b"):
        assert graphs.replay(key, None, (x,), slots) is None  # eager every time
    assert emptied == [True]  # the one failed attempt's memory went back
    assert graphs.stats.failures[0].startswith("capture failed (OutOfMemoryError")
    assert graphs.stats.failures[1].startswith("no more captures: an earlier one ran out of memory")
    assert graphs.stats.eager_calls == 4


def test_release_drops_every_captured_step_and_the_pool(monkeypatch):
    from sftop.kernels import packed_graphs

    monkeypatch.setattr(cg, "_room_for_capture", lambda static_bytes=0: None)
    captured = []

    def capture(self, fn, inputs, slots, backward=True, grad_inputs=()):
        captured.append(backward)
        return _fake_step(slots[0][2], backward), None

    monkeypatch.setattr(cg.StepGraphs, "_capture", capture)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(5))
    slots = [(model, "w", model.w)]
    fixed, packed, logprob = cg.StepGraphs(), cg.StepGraphs(), cg.StepGraphs()
    model.__dict__[M.GRAPHS] = fixed
    model.__dict__[packed_graphs._PACKED_GRAPHS] = packed
    dpo = types.SimpleNamespace(steps=logprob)  # a LogprobGraphs as DPO's head keeps it on the model
    model.__dict__[M.LOGPROB_GRAPHS] = dpo
    x = torch.randn(5)
    for graphs in (fixed, packed, logprob):
        assert graphs.replay("k", None, (x,), slots) is None  # first sighting: eager
        graphs.replay("k", None, (x,), slots)[0].sum().backward()  # second: captured and replayed
        assert graphs.holds("k")
        graphs._pool, graphs._refuse_all = (3, 0), "earlier out of memory"
    packed_graphs.release_graphs(model)
    for graphs in (fixed, packed, logprob):
        assert not graphs.holds("k") and graphs._pool is None and graphs._refuse_all is None
        assert not graphs._grad_ptrs and not graphs._trained
    assert M.LOGPROB_GRAPHS not in model.__dict__  # DPO's next graphed call starts afresh
    # what was released is captured again when the key comes back twice
    assert fixed.replay("k", None, (x,), slots) is None
    fixed.replay("k", None, (x,), slots)[0].sum().backward()
    assert fixed.holds("k") and captured == [True, True, True, True]


def test_a_full_garbage_collection_runs_only_where_the_warm_ups_left_memory():
    """Before a capture the warm-ups' garbage goes: the young generations always, a full collection
    (every object of the process) only where GPU memory is still allocated beyond the baseline and
    the capture is short of room."""
    calls = []

    def collect(generation=2):
        calls.append(generation)
        return 0

    assert cg.collect_warm_up_garbage(1000, allocated=lambda: 1000, collect=collect) is False
    assert calls == [1]
    calls.clear()
    left = iter([1500])  # a cycle still holds a warm-up's tensor after the young collection
    assert cg.collect_warm_up_garbage(1000, allocated=lambda: next(left), collect=collect) is True
    assert calls == [1, 2]
    calls.clear()
    # with room to spare for the capture (full=False) memory left allocated is no reason to search
    # every object: a first capture always leaves some (cuBLAS workspace, scratch buffers)
    assert cg.collect_warm_up_garbage(1000, allocated=lambda: 1500, collect=collect, full=False) is False
    assert calls == [1]


def test_keys_known_to_recur_are_captured_at_their_first_sighting(monkeypatch):
    """A packed run's fitted length buckets recur by construction: their training step is captured
    the first time, without an eager step before the capture's warm-up; other keys still wait for a
    second sighting, and a forward-only step keeps its own rule."""
    captured, slots = _fake_captures(monkeypatch)
    graphs = cg.StepGraphs(recurring=lambda key: key[1] in (128, 256))
    assert graphs.would_capture(("packed", 128)) and not graphs.would_capture(("packed", 300))
    for length in (128, 300, 256, 300, 128):
        out = graphs.replay(("packed", length), None, (torch.randn(5),), slots)
        if out is not None:
            out[0].sum().backward()
    assert captured == [True] * 3  # 128 and 256 at once, 300 on its second sighting
    assert all(graphs.holds(("packed", n)) for n in (128, 256, 300))
    assert (graphs.stats.eager_calls, graphs.stats.replays) == (1, 4)
    with torch.no_grad():  # forward-only: waits for its second sighting after a training capture
        assert graphs.replay(("reference", 128), None, (torch.randn(5),), slots, backward=False) is None


def test_later_captures_of_a_model_warm_up_once(monkeypatch):
    """A model's first capture runs two warm-up steps (Triton compiles, cuBLAS workspaces, scratch
    buffers); its later ones (other shapes, other buckets) one, each a whole eager step saved."""
    runs = []

    class Recorded:
        grad_ptrs: set = set()
        grads: list = []

        def __init__(self, *args, warm_up_runs, **kwargs):
            runs.append(warm_up_runs)

    monkeypatch.setattr(cg, "CapturedStep", Recorded)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    graphs = cg.StepGraphs()
    x = torch.ones(2)
    for _ in range(3):
        step, why = graphs._capture(lambda t: t * 2, (x,), [], backward=False)
        assert why is None and isinstance(step, Recorded)
    assert runs == [cg.WARMUP_RUNS, cg.LATER_WARMUP_RUNS, cg.LATER_WARMUP_RUNS] == [2, 1, 1]


def test_the_cache_is_given_back_before_a_capture_only_where_free_memory_is_short(monkeypatch):
    """A capture asks for twice the largest step transient (here 0.2 GiB) beside what is live. With
    the GPU's free memory (under a cap, what is left under it) holding that, the ordinary cache's
    blocks stay for the eager steps after it; short of it, they go back first."""
    _fake_allocator(monkeypatch, limit_gib=80.0, allocated_gib=2.5, peak_gib=2.7, reserved_gib=3.0)
    assert not cg.cache_release_needed()  # 70 GiB free
    _fake_allocator(monkeypatch, limit_gib=3.3, allocated_gib=2.5, peak_gib=2.7, reserved_gib=3.0)
    assert cg.cache_release_needed()  # 0.3 GiB left under the cap, 0.4 needed: the 0.5 cached must go
    assert cg._room_for_capture() is None  # and with them it fits
