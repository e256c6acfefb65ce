"""Parts vision_graphs and language_graphs (sftop/kernels/patching/vision_graphs.py,
language_graphs.py): a Qwen2.5-VL tower's blocks and its language layers replayed from CUDA graphs.

CPU: sftop's copy of the tower forward equals transformers' (outputs and LoRA gradients); the
replay plumbing, with each "captured" step standing in as one that runs its function afresh on
its static inputs, gives the eager tower's outputs and gradients, captures on a layout's second
sighting, keys on grid, grad mode and adapter state, and is released on an out-of-memory
step-down; the part says why it stays stock.  A whole VLM step with both parts (the language
layers handing their gradient back to the image embeddings) gives the eager model's loss and every
LoRA gradient, the tower's included.  GPU: real captures in bf16, with and without checkpointing,
equal the eager tower.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _kernel_testutil import rel_err
from _rerun_steps import rerun_captures as install_rerun_captures
from test_vision_tower import _pixels, _run_tower, _tower, _tower_model, wide_qwen25_vl_bf16

from sftop.kernels import cuda_graphs as cg
from sftop.kernels.patching import markers as M
from sftop.kernels.patching import vision_graphs as VG
from sftop.kernels.patching.vision_tower import patch_vision_tower

HAS_CUDA = torch.cuda.is_available()
TARGETS = r".*visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)"


def _lora_tower_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model, _ = _tower_model("qwen2_5_vl", seed=seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    return model


def _with_graphs(model, monkeypatch) -> cg.StepGraphs:
    """The tower parts, then vision_graphs applied as on a GPU (its CUDA check passed)."""
    monkeypatch.setenv(VG.ENV_SWITCH, "1")
    patch_vision_tower(model)
    tower = _tower(model)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert VG.patch_graphs(tower, None) == "fused"
    return tower.__dict__[M.TOWER_GRAPHS]


@pytest.fixture
def rerun_captures(monkeypatch):
    return install_rerun_captures(monkeypatch)


def test_sftops_tower_forward_equals_transformers(monkeypatch):
    stock = _lora_tower_model()
    patched = copy.deepcopy(stock)
    plain = copy.deepcopy(stock)
    _with_graphs(patched, monkeypatch)
    patch_vision_tower(plain)  # every other part: the eager tower sftop's forward must equal
    ran = []
    real = VG.run_blocks
    monkeypatch.setattr(VG, "run_blocks", lambda *a: (ran.append(1), real(*a))[1])
    pixels, grid = _pixels(stock.config.vision_config)
    out_s, grads_s = _run_tower(stock, pixels, grid)
    out_e, grads_e = _run_tower(plain, pixels, grid)
    out_p, grads_p = _run_tower(patched, pixels, grid)
    assert ran == [1]  # sftop's forward ran (eagerly on the CPU), not the stock one
    assert torch.equal(out_p, out_e)
    assert rel_err(out_p, out_s) < 1e-5
    assert grads_p.keys() == grads_s.keys() and any("lora_" in n for n in grads_p)
    for n in grads_p:
        assert torch.equal(grads_p[n], grads_e[n]), n
        assert rel_err(grads_p[n], grads_s[n]) < 1e-4, n


def test_blocks_replay_from_the_graphs_like_the_eager_tower(monkeypatch, rerun_captures):
    eager = _lora_tower_model()
    graphed = copy.deepcopy(eager)
    patch_vision_tower(eager)
    graphs = _with_graphs(graphed, monkeypatch)
    eager.train(), graphed.train()
    pixels, grid = _pixels(eager.config.vision_config)
    blocks = _tower(graphed).blocks
    trainable = sum(1 for p in blocks.parameters() if p.requires_grad)
    for call in range(3):
        out_e, grads_e = _run_tower(eager, pixels, grid)
        out_g, grads_g = _run_tower(graphed, pixels, grid)
        assert rel_err(out_g, out_e) < 1e-6, call
        assert grads_g.keys() == grads_e.keys()
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-6, (call, n)
    # the first sighting ran eagerly, the second captured forward and backward, then replays
    n_patches = int(grid.prod(-1).sum())
    assert (graphs.stats.eager_calls, graphs.stats.captures, graphs.stats.replays) == (1, 1, 2)
    shapes, n_slots, backward = rerun_captures[0]
    assert shapes[0] == (n_patches, eager.config.vision_config.hidden_size) and len(shapes) == 5
    assert n_slots == trainable > 0 and backward is True

    # another image layout is another key: eager on its first sighting
    other = torch.tensor([[1, 4, 8]])
    _run_tower(graphed, torch.randn(32, pixels.shape[1]), other)
    assert graphs.stats.eager_calls == 2 and graphs.stats.captures == 1
    # no gradient (a reference forward), and the adapters switched off: keys of their own
    with torch.no_grad():
        for _ in range(3):
            _tower(graphed)(pixels, grid_thw=grid)
    assert rerun_captures[-1][1:] == (0, False)  # a forward-only capture, nothing trained
    replays = graphs.stats.replays
    with graphed.disable_adapter(), torch.no_grad():
        off = _tower(graphed)(pixels, grid_thw=grid).pooler_output
    with eager.disable_adapter(), torch.no_grad():
        off_eager = _tower(eager)(pixels, grid_thw=grid).pooler_output
    assert torch.equal(off, off_eager) and not torch.equal(off, out_e)
    # the adapter-off call replayed neither captured step: a first sighting of its own key
    assert len(rerun_captures) == 2 and graphs.stats.replays == replays

    # an out-of-memory step-down drops the tower's captures too
    from sftop.kernels.packed_graphs import release_graphs

    release_graphs(graphed)
    assert not graphs._steps and graphs._pool is None


@pytest.mark.parametrize("kind", ["non-reentrant", "reentrant", "offload-hf"])
def test_checkpointed_blocks_with_a_grad_hooked_patch_embedding(kind, monkeypatch, rerun_captures):
    """transformers' enable_input_require_grads marks the patch embedding's output as needing a
    gradient: the captured blocks take it as such.  Reentrant checkpoints give autograd.grad no
    parameter gradients, and transformers' offload (save_on_cpu) pins host memory per saved tensor,
    which a capture cannot do: under either the blocks stay eager."""
    eager = _lora_tower_model()
    graphed = copy.deepcopy(eager)
    patch_vision_tower(eager)
    graphs = _with_graphs(graphed, monkeypatch)
    if kind == "offload-hf" and not HAS_CUDA:  # transformers' save_on_cpu, pinned only where a GPU is
        import transformers.modeling_utils as modeling_utils

        real = modeling_utils.save_on_cpu
        monkeypatch.setattr(modeling_utils, "save_on_cpu", lambda pin_memory, device_type: real(False, device_type))
    for m in (eager, graphed):
        m.train()
        m.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": kind == "reentrant"}, offload=kind == "offload-hf"
        )
        m.enable_input_require_grads()
    pixels, grid = _pixels(eager.config.vision_config)
    for call in range(3):
        out_e, grads_e = _run_tower(eager, pixels, grid)
        out_g, grads_g = _run_tower(graphed, pixels, grid)
        assert rel_err(out_g, out_e) < 1e-6, call
        lora = [n for n in grads_e if "lora_" in n]
        assert lora and grads_g.keys() == grads_e.keys(), call
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-6, (call, n)
    assert (graphs.stats.captures, graphs.stats.replays) == ((1, 2) if kind == "non-reentrant" else (0, 0))


def _qwen_vlm(monkeypatch, device="cpu", dtype=torch.float32):
    """(eager, graphed, batch, the tower's graphs, the language layers' graphs): a tiny Qwen2.5-VL with
    LoRA on the language and tower layers and sftop's kernels as `sftop run` puts them, twice; the
    second with both graph parts on (their CUDA check passed where there is no GPU)."""
    import sys
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vision"))
    from vision_family_rows import family, image, processor, rows, single

    from sftop.engine.models.vision.collator import VisionCollator
    from sftop.engine.models.vision.loading import apply_vision_kernels
    from sftop.engine.models.vision.lora_parts import target_module_names
    from sftop.engine.models.vision.registry import all_families
    from sftop.kernels.patching import language_graphs as LG

    fam = family("qwen2_5_vl")
    torch.manual_seed(0)
    config = fam.tiny_config()
    config.vision_config.depth = 3  # windowed, full, windowed
    model = all_families()["qwen2_5_vl"].model_class().from_config(config, attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    targets = target_module_names(model, fam, ["language", "vision", "attention", "mlp"])
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    )
    graphed = copy.deepcopy(model)
    collate = VisionCollator(fam, processor("qwen2_5_vl"))
    batch = collate([single(image("qwen2_5_vl", 2, 3)), rows("qwen2_5_vl")["two-turns"]])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    monkeypatch.setattr("sftop.engine.models.loading.cuda_available", lambda: True)
    for m in (model, graphed):
        apply_vision_kernels(m, fam, "auto")
        m.train()
    monkeypatch.setenv(VG.ENV_SWITCH, "1")
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert VG.patch_graphs(_tower(graphed), None) == "fused"
        assert LG.patch_language_graphs(graphed) == "fused"
    tower_graphs = _tower(graphed).__dict__[M.TOWER_GRAPHS]
    language_graphs = LG.find_language_models(graphed)[0].__dict__[M.LANGUAGE_GRAPHS]
    return model, graphed, batch, tower_graphs, language_graphs


def _vlm_step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulated_step(model, batch, micro_batches: int = 2):
    """The LoRA gradients of `micro_batches` backward passes over `batch`, accumulated in .grad."""
    model.zero_grad(set_to_none=True)
    for _ in range(micro_batches):
        model(**batch, use_cache=False).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_whole_vlm_step_with_the_tower_and_language_layers_graphed(monkeypatch, rerun_captures):
    """With both graph parts the loss and every LoRA gradient equal the eager model's over three
    steps, the tower's adapters learning through the gradient the language layers hand back."""
    model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch)
    for step in range(3):
        loss_e, grads_e = _vlm_step(model, batch)
        loss_g, grads_g = _vlm_step(graphed, batch)
        assert rel_err(loss_g, loss_e) < 1e-6, step
        assert grads_g.keys() == grads_e.keys(), step
        assert any(".visual." in n for n in grads_e) and any("language_model" in n for n in grads_e)
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-5, (step, n)
    for graphs in (tower_graphs, language_graphs):
        assert (graphs.stats.eager_calls, graphs.stats.captures, graphs.stats.replays) == (1, 1, 2)
    # the language layers' capture took the embeddings' gradient, the tower's nothing but its adapters
    assert [backward for _shapes, _n, backward in rerun_captures] == [True, True]
    rows_, tokens = batch["input_ids"].shape
    lm_shapes = rerun_captures[1][0]
    assert lm_shapes[0][:2] == (rows_, tokens)  # the embeddings, then cos and sin
    assert lm_shapes[3] == (rows_, 1, tokens, tokens)  # the rows differ in length: the padding mask goes in too
    # the loss part's shifted labels go in last: the loss is computed inside the language graphs
    assert lm_shapes[4] == (rows_, tokens) and len(lm_shapes) == 5


def test_the_first_captures_of_tower_and_language_layers_share_one_pool(monkeypatch, rerun_captures):
    """The tower's first training capture opens the shared cycle and waits for its backward; the
    language layers' capture in the same step joins its pool; the tower's backward, captured at its
    first backward, closes it.  Gradient accumulation over two micro-batches a step still gives the
    eager model's gradients (every member's .grad moved off the shared static buffers before any
    member replays).  Switched off, each stack keeps a pool of its own."""
    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "1")
    model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch)
    group = tower_graphs.group
    assert group is not None and group is language_graphs.group and group.leader is tower_graphs

    for step in range(3):
        grads_e, grads_g = _accumulated_step(model, batch), _accumulated_step(graphed, batch)
        assert grads_g.keys() == grads_e.keys(), step
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-5, (step, n)
    (tower_step,) = tower_graphs._steps.values()
    (language_step,) = language_graphs._steps.values()
    assert tower_step.pool == language_step.pool == group.pool == (1, 0)
    assert not tower_step.backward_pending and group.state == "closed"

    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "0")
    _model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch)
    assert tower_graphs.group is None and language_graphs.group is None
    for _ in range(2):
        _vlm_step(graphed, batch)
    (tower_step,) = tower_graphs._steps.values()
    (language_step,) = language_graphs._steps.values()
    assert tower_step.pool != language_step.pool


def test_dpo_forwards_reference_then_policy_through_both_graph_parts(monkeypatch, rerun_captures):
    """A DPO micro-batch's two forwards through the fused log-prob head: the reference (adapters
    off, no gradient) then the policy, as sftop's DPO trainer orders them.  The reference takes
    forward-only captures of its own keys, the policy training ones; log-probabilities and every
    LoRA gradient equal the eager model's."""
    from sftop.kernels.patching.logprob_head import install_logprob_head

    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "1")
    model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch)
    labels = batch.pop("labels")
    for m in (model, graphed):
        assert install_logprob_head(m.get_base_model()) == "fused"

    def dpo_step(m):
        m.zero_grad(set_to_none=True)
        with torch.no_grad(), m.disable_adapter():
            ref = m(**batch, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        policy = m(**batch, labels=labels, fused_lm_head=True, use_cache=False).log_probs
        ((policy - ref) * torch.linspace(0.5, 1.5, policy.shape[-1])).sum().backward()
        return ref, policy.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    for step in range(4):
        ref_e, pol_e, grads_e = dpo_step(model)
        ref_g, pol_g, grads_g = dpo_step(graphed)
        assert rel_err(ref_g, ref_e) < 1e-6 and rel_err(pol_g, pol_e) < 1e-6, step
        assert grads_g.keys() == grads_e.keys() and any(".visual." in n for n in grads_e), step
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-5, (step, n)
    for graphs in (tower_graphs, language_graphs):
        assert graphs.stats.captures == 2 and graphs.stats.failures == []  # the policy's, then the reference's
        # the reference's forward-only steps replay while no graphed forward waits for its backward,
        # into the pool the policy's shared cycle made
        assert {step.pool for step in graphs._steps.values()} == {tower_graphs.group.pool}
    assert sorted(backward for _shapes, _n, backward in rerun_captures) == [False, False, True, True]


def test_re_enabled_checkpointing_keeps_the_captured_steps(monkeypatch, rerun_captures):
    """`gradient_checkpointing_enable` sets a fresh checkpoint function on every call, and TRL's
    DPOTrainer calls it after every reference forward: the keys hold what the function is made of,
    so each step after the capture replays instead of capturing again."""
    model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch)
    for step in range(4):
        for m in (model, graphed):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_e, grads_e = _vlm_step(model, batch)
        loss_g, grads_g = _vlm_step(graphed, batch)
        assert rel_err(loss_g, loss_e) < 1e-6, step
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-5, (step, n)
    for graphs in (tower_graphs, language_graphs):
        assert (graphs.stats.eager_calls, graphs.stats.captures, graphs.stats.replays) == (1, 1, 3)


def test_checkpoint_keys_tell_the_functions_apart_not_their_objects():
    import functools

    from torch.utils.checkpoint import checkpoint

    from sftop.kernels import checkpoint_offload as co
    from sftop.kernels.patching.graph_checks import checkpoint_key

    def block(fn):
        m = torch.nn.Linear(2, 2)
        m.gradient_checkpointing, m._gradient_checkpointing_func = True, fn
        return m

    plain = [block(functools.partial(checkpoint, use_reentrant=False)) for _ in range(2)]
    assert checkpoint_key(plain[0]) == checkpoint_key(plain[1])
    offloaded = [block(co.checkpoint_function({"use_reentrant": False})) for _ in range(2)]
    assert checkpoint_key(offloaded[0]) == checkpoint_key(offloaded[1])  # new hooks, same work
    assert checkpoint_key(offloaded[0]) != checkpoint_key(plain[0])
    # what the hooks offload is part of the captured work
    assert checkpoint_key(block(co.checkpoint_function({"use_reentrant": False}, min_bytes=0))) != checkpoint_key(
        offloaded[0]
    )
    assert checkpoint_key(block(functools.partial(checkpoint, use_reentrant=True))) != checkpoint_key(plain[0])
    hash(checkpoint_key(offloaded[0]))


def test_offload_hooks_chain_each_layer_stack_apart(monkeypatch):
    """sftop's offloaded checkpointing on a VLM: one hooks object for the tower's blocks, another
    for the language layers, so backward never fetches a tower block's input ahead from inside the
    language layers' captured backward."""
    from sftop.kernels.patching import checkpointing

    model, _graphed, batch, _t, _l = _qwen_vlm(monkeypatch)
    base = model.get_base_model()
    checkpointing.install(base)
    base.__dict__[M.OFFLOAD_OK] = True  # what part checkpoint_offload sets where a GPU is
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)

    def hooks_of(layers):
        return {id(layer._gradient_checkpointing_func.keywords["_offload"]) for layer in layers}

    tower = hooks_of(base.model.visual.blocks)
    language = hooks_of(base.model.language_model.layers)
    assert len(tower) == 1 and len(language) == 1 and tower != language
    assert checkpointing.layer_stack("model.visual.blocks.3") == "model.visual.blocks"
    _vlm_step(model, batch)  # the hooks leave CPU tensors where they are: the step runs as before


def test_the_part_says_why_it_stays_stock(monkeypatch):
    model = _lora_tower_model()
    monkeypatch.setenv(VG.ENV_SWITCH, "0")
    assert patch_vision_tower(model)["vision_graphs"] == "stock: turned off by SFTOP_VISION_GRAPHS=0"
    monkeypatch.delenv(VG.ENV_SWITCH)  # on by default
    if not HAS_CUDA:
        assert patch_vision_tower(model)["vision_graphs"] == "stock: CUDA graphs need a CUDA GPU"
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    assert patch_vision_tower(model)["vision_graphs"] == "stock: turned off by SFTOP_CUDA_GRAPHS=0"
    monkeypatch.delenv(cg.ENV_SWITCH)
    qwen2, _ = _tower_model("qwen2_vl")
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        why = VG.patch_graphs(_tower(qwen2), None)
    assert why.startswith("stock: only Qwen2_5_VisionTransformerPretrainedModel"), why
    from sftop.kernels.patching import language_graphs as LG

    assert LG.patch_language_graphs(qwen2).startswith("stock: only Qwen2_5_VLTextModel")
    monkeypatch.setenv(VG.ENV_SWITCH, "0")
    assert LG.patch_language_graphs(model) == "stock: turned off by SFTOP_VISION_GRAPHS=0"
    # unpatching takes the tower's graphs off with its forward
    _with_graphs(model, monkeypatch)
    tower = _tower(model)
    patch_vision_tower(model, enable=False)
    assert M.TOWER_GRAPHS not in tower.__dict__ and "forward" not in tower.__dict__


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_gpu_graphed_blocks_equal_the_eager_tower(checkpointing, monkeypatch):
    """A bf16 Qwen2.5-VL tower of the 3B's width (1280, 16 heads), four blocks, LoRA r=16 on every
    linear: the captured blocks' outputs and LoRA gradients equal the eager tower's over three
    steps (first sighting eager, second captured, third replayed)."""
    from peft import LoraConfig, get_peft_model

    from sftop.kernels import patch_model

    model = wide_qwen25_vl_bf16()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    eager = copy.deepcopy(model)
    for m in (model, eager):
        assert patch_model(m, model_type="qwen2", only=("lora",)).parts["lora"] == "fused"
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_vision_tower(eager)
    monkeypatch.setenv(VG.ENV_SWITCH, "1")
    assert patch_vision_tower(model)["vision_graphs"] == "fused"
    graphs = _tower(model).__dict__[M.TOWER_GRAPHS]
    grid = torch.tensor([[1, 32, 32], [1, 20, 28]], device="cuda")  # uneven windows in the second
    g = torch.Generator("cuda").manual_seed(1)
    for step in range(3):
        pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda", generator=g).bfloat16()
        out_e, grads_e = _run_tower(eager, pixels, grid)
        out_g, grads_g = _run_tower(model, pixels, grid)
        assert rel_err(out_g, out_e) < 1e-2, step
        assert grads_g.keys() == grads_e.keys() and any("lora_" in n for n in grads_g)
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 2e-2, (step, n)
    assert graphs.stats.failures == []
    assert (graphs.stats.eager_calls, graphs.stats.captures, graphs.stats.replays) == (1, 1, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpointing", ["off", "on", "offload"])
def test_gpu_whole_vlm_step_with_both_graph_parts_equals_eager(checkpointing, monkeypatch):
    """The tiny Qwen2.5-VL in bf16 on the GPU, real captures of the tower's blocks and the language
    layers: loss and every LoRA gradient equal the eager model's over three steps.  "offload": the
    graphed model's checkpointed inputs go to host memory through sftop's overlapped offload (every
    size of them here), which both captures take, against the eager model's plain checkpoints."""
    from sftop.kernels import checkpoint_offload as co

    monkeypatch.setattr(co, "DEFAULT_MIN_BYTES", 0)
    model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch, "cuda", torch.bfloat16)
    if checkpointing != "off":
        for m in (model, graphed):
            m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False},
                offload=checkpointing == "offload" and m is graphed,
            )
    for step in range(3):
        loss_e, grads_e = _vlm_step(model, batch)
        loss_g, grads_g = _vlm_step(graphed, batch)
        assert rel_err(loss_g, loss_e) < 1e-2, step
        assert grads_g.keys() == grads_e.keys() and any(".visual." in n for n in grads_e), step
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 2e-2, (step, n)
    for graphs in (tower_graphs, language_graphs):
        assert graphs.stats.failures == []
        assert (graphs.stats.eager_calls, graphs.stats.captures, graphs.stats.replays) == (1, 1, 2)
        # the captured step copies into host buffers of its own exactly when offloading
        (captured,) = graphs._steps.values()
        assert bool(captured.host_buffers) is (checkpointing == "offload")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_accumulated_vlm_steps_through_one_shared_pool(monkeypatch):
    """Offloaded checkpointing, two micro-batches a step: the tower's and language layers' captures
    live in one memory pool (the tower's backward captured at its first backward, after the
    language layers'), and the accumulated LoRA gradients equal the eager model's over three steps,
    the tower's static gradients moved off before the language layers' replays rewrite the pool."""
    from sftop.kernels import checkpoint_offload as co

    monkeypatch.setattr(co, "DEFAULT_MIN_BYTES", 0)
    monkeypatch.setenv("SFTOP_SHARED_GRAPH_POOL", "1")
    model, graphed, batch, tower_graphs, language_graphs = _qwen_vlm(monkeypatch, "cuda", torch.bfloat16)
    for m in (model, graphed):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=m is graphed)

    for step in range(3):
        grads_e, grads_g = _accumulated_step(model, batch), _accumulated_step(graphed, batch)
        assert grads_g.keys() == grads_e.keys() and any(".visual." in n for n in grads_e), step
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 2e-2, (step, n)
    for graphs in (tower_graphs, language_graphs):
        assert graphs.stats.failures == [] and graphs.stats.captures == 1
    assert tower_graphs.group.state == "closed"
    (tower_step,) = tower_graphs._steps.values()
    (language_step,) = language_graphs._steps.values()
    assert tower_step.pool == language_step.pool == tower_graphs.group.pool
    assert language_graphs._private_pool is None and tower_graphs._private_pool is None


def test_a_frozen_tower_runs_no_backward_through_its_blocks(monkeypatch):
    """transformers' enable_input_require_grads marks the patch embeddings as needing a gradient,
    so the stock frozen tower saves its blocks' tensors and runs their backward for nothing; sftop's
    forward cuts that path (eagerly too: a layout seen once), the merger's LoRA still learning."""
    from peft import LoraConfig, get_peft_model

    def frozen_blocks_model():
        model, _ = _tower_model("qwen2_5_vl")
        merger = r".*visual\.merger\.mlp\.(0|2)"
        return get_peft_model(model, LoraConfig(r=4, target_modules=merger, init_lora_weights=False))

    stock = frozen_blocks_model()
    patched = copy.deepcopy(stock)
    _with_graphs(patched, monkeypatch)
    block_backwards = {"stock": 0, "patched": 0}
    for name, m in (("stock", stock), ("patched", patched)):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()

        def count(*_args, name=name):
            block_backwards[name] += 1

        _tower(m).blocks[0].register_full_backward_hook(count)
    pixels, grid = _pixels(stock.config.vision_config)
    out_s, grads_s = _run_tower(stock, pixels, grid)
    out_p, grads_p = _run_tower(patched, pixels, grid)
    assert block_backwards == {"stock": 1, "patched": 0}
    assert rel_err(out_p, out_s) < 1e-5
    assert grads_p.keys() == grads_s.keys() and grads_s and all("merger" in n for n in grads_s)
    for n in grads_s:
        assert rel_err(grads_p[n], grads_s[n]) < 1e-5, n
