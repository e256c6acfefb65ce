"""Gemma 3's vision-language model through sftop's kernels, as `sftop run` applies them
(loading.apply_vision_kernels): the language layers take the gemma3_text kernels and the fused
loss (sftop/kernels/patching/families/gemma3.py) while their attention keeps transformers' mask, in
which an image's tokens see each other both ways; the SigLIP tower takes its q/k/v LoRA as one
Function and its patch embedding as one GEMM (sftop/kernels/patching/siglip_tower.py).  Patched and
stock give the same loss and LoRA gradients in float32 (CPU); test_gemma3_kernels_gpu.py checks
bf16 on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from vision_family_rows import family, image, processor, rows, single

from sftop.engine.models.vision import loading
from sftop.engine.models.vision.collator import VisionCollator
from sftop.engine.models.vision.lora_parts import target_module_names
from sftop.kernels import unpatch
from sftop.kernels.patching import markers
from sftop.kernels.patching.siglip_tower import SIGLIP_PARTS
from sftop.kernels.patching.towers import patch_towers

LANGUAGE_FUSED = ("rms_norm", "rope", "mlp", "lora", "attention_lora", "loss")
TOWER_FUSED = ("vision_qkv_lora", "vision_patch_embed")
WINDOW = 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))  # NaN compares False: fails


def _lora_model(attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model

    fam = family("gemma3")
    model = fam.tiny_model(seed=3)
    model.set_attn_implementation(attn)
    # a local window narrower than the rows, so the sliding layer's mask joins window and image blocks
    model.config.text_config.sliding_window = WINDOW
    for m in model.modules():
        if type(m).__name__ == "Gemma3Attention" and m.is_sliding:
            m.sliding_window = WINDOW
    # language and tower, attention and MLP; B != 0 so that every adapter gradient is non-trivial
    targets = target_module_names(model, fam, ["language", "vision", "attention", "mlp"])
    assert any("vision_tower" in t for t in targets) and any("language_model" in t for t in targets)
    torch.manual_seed(0)  # the adapters' init draws from the global generator: the same weights every run
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    )


def _batch():
    fam = family("gemma3")
    batch = VisionCollator(fam, processor("gemma3"))([single(image("gemma3", 2, 3)), rows("gemma3")["multi"]])
    # three images over two rows; the image tokens are marked for the bidirectional mask
    assert batch["pixel_values"].shape[0] == 3 and int(batch["token_type_ids"].sum()) == 3 * 4
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Count(torch.utils._python_dispatch.TorchDispatchMode):
    """How many convolutions and SDPA calls run, and the input dtypes of every matrix product."""

    MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.linear")

    def __init__(self):
        super().__init__()
        self.convolutions = 0
        self.sdpa = 0
        self.matmul_dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "convolution" in str(func.overloadpacket):
            self.convolutions += 1
        if "scaled_dot_product" in str(func.overloadpacket):
            self.sdpa += 1
        if str(func.overloadpacket) in self.MATMULS:
            self.matmul_dtypes.append(next(a.dtype for a in args if torch.is_tensor(a)))
        return func(*args, **(kwargs or {}))


def test_language_layers_and_tower_take_the_kernels_and_match_stock(monkeypatch):
    import sftop.kernels.lora_linear as LL
    import sftop.kernels.rope as rope

    batch = _batch()
    stock = _lora_model()
    fused = copy.deepcopy(stock)
    report = loading.apply_vision_kernels(fused, family("gemma3"), "on")
    parts, tower = report["parts"], report["vision_parts"]
    assert {p: parts[p] for p in LANGUAGE_FUSED} == {p: "fused" for p in LANGUAGE_FUSED}, parts
    # the causal packed attention is refused, with the bidirectional image mask as the reason
    assert parts["attention"].startswith("stock: ") and "both ways" in parts["attention"]
    assert set(tower) == set(SIGLIP_PARTS)
    assert {p: tower[p] for p in TOWER_FUSED} == {p: "fused" for p in TOWER_FUSED}, tower
    assert tower["vision_attention"] == "stock: the tower's attention is already 'sdpa' (no mask: flash attention)"
    base = fused.get_base_model()
    patched = {n for n, m in base.named_modules() if markers.ORIG_FORWARD in vars(m)}
    assert "model.language_model.layers.0.self_attn.q_norm" in patched  # qk norm
    assert "model.language_model.layers.1.mlp" in patched
    # gate/up/down with LoRA: the whole MLP as one LoRA Function with the gelu-tanh GLU
    mlps = [base.model.language_model.layers[i].mlp for i in range(2)]
    assert [vars(m)[markers.LORA_MLP_ADAPTER] for m in mlps] == ["default", "default"]
    assert "model.multi_modal_projector.mm_soft_emb_norm" not in patched  # the projector's norm stays stock
    assert "model.vision_tower.embeddings" in patched
    assert "model.vision_tower.encoder.layers.1.self_attn.k_proj" in patched

    rope_launches, qkv_calls = [], []
    real_launch, real_qkv = rope._launch, LL.LoRAQKVFunction.apply
    monkeypatch.setattr(rope, "_launch", lambda *a, **k: (rope_launches.append(k["backward"]), real_launch(*a, **k))[1])
    monkeypatch.setattr(LL.LoRAQKVFunction, "apply", lambda *a: (qkv_calls.append(a[0].shape), real_qkv(*a))[1])
    for m in (stock, fused):
        m.train()
    s_out, s_grads = _loss_and_grads(stock, batch)
    counter = _Count()
    with counter:
        f_out, f_grads = _loss_and_grads(fused, batch)
    # RoPE ran through the kernel in both layers (local and global base), forward and backward
    assert rope_launches.count(False) == 2 and rope_launches.count(True) == 2
    # one q/k/v Function per attention block: two tower layers on patches, two language layers
    assert len(qkv_calls) == 4 and sum(s[-2] == 16 for s in qkv_calls) == 2, qkv_calls
    assert counter.convolutions == 0  # the patch embedding ran as a GEMM
    assert f_out.logits is None  # the fused loss, no full logits
    assert rel_err(f_out.loss, s_out.loss) < 1e-5
    assert s_grads.keys() == f_grads.keys() and len(s_grads) > 0
    assert any("vision_tower" in n for n in s_grads)
    for n, g in s_grads.items():
        assert g.abs().sum() > 0, n
        assert rel_err(f_grads[n], g) < 1e-4, n

    # the mask matters in this batch: without token_type_ids (causal only) the gradients move by
    # far more than the tolerance above, so that equality holds with the image blocks in place
    _, c_grads = _loss_and_grads(stock, {k: v for k, v in batch.items() if k != "token_type_ids"})
    assert max(rel_err(c_grads[n], g) for n, g in s_grads.items()) > 1e-2

    unpatch(fused)
    assert patch_towers(fused, enable=False) == {p: "stock: disabled" for p in SIGLIP_PARTS}
    assert not any(markers.ORIG_FORWARD in vars(m) for m in fused.modules())
    u_out, _ = _loss_and_grads(fused, batch)
    assert u_out.logits is not None and rel_err(u_out.loss, s_out.loss) < 1e-6


def test_eager_tower_attention_runs_sdpa_and_goes_back():
    """A model loaded with eager attention: the tower (no mask) moves to SDPA, the language layers
    keep eager (their mask is the model's), outputs equal, and disabling restores eager."""
    model = _lora_model(attn="eager")
    vision = model.get_base_model().model.vision_tower
    pixels = _batch()["pixel_values"]
    before = _Count()
    with torch.no_grad(), before:
        ref = vision(pixel_values=pixels).last_hidden_state
    assert before.sdpa == 0
    parts = patch_towers(model)
    assert parts["vision_attention"] == "fused"
    assert vision.config._attn_implementation == "sdpa"
    assert model.get_base_model().config.text_config._attn_implementation == "eager"
    counter = _Count()
    with torch.no_grad(), counter:
        out = vision(pixel_values=pixels).last_hidden_state
    assert rel_err(out, ref) < 1e-5
    assert counter.sdpa == 2  # one a layer
    patch_towers(model, enable=False)
    assert vision.config._attn_implementation == "eager"
    assert markers.VISION_ATTN_IMPLEMENTATION not in vars(vision)


@pytest.mark.parametrize("side", [32, 40], ids=["tower-size", "other-size"])
def test_patch_embedding_gemm_equals_the_convolution(side):
    """Odd channel count, patches off the square: the GEMM path equals the Conv2d, and an image of
    another size than the position table's (interpolation's business) keeps the stock forward."""
    model = family("gemma3").tiny_model(seed=1)
    embed = model.model.vision_tower.embeddings
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(3, 3, side, side, generator=g, dtype=torch.float64)
    embed.double()
    with torch.no_grad():
        ref = embed(pixels, interpolate_pos_encoding=side != 32)
        assert patch_towers(model)["vision_patch_embed"] == "fused"
        counter = _Count()
        with counter:
            out = embed(pixels, interpolate_pos_encoding=side != 32)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-12
    assert counter.convolutions == (0 if side == 32 else 1)


def test_other_models_keep_their_tower_report():
    """A model without a tower sftop knows names both kinds; Qwen-VL towers keep their own parts."""
    from sftop.kernels.patching.vision_tower import VISION_PARTS

    model = family("llava").tiny_model()
    parts = patch_towers(model)
    assert set(parts) == set(VISION_PARTS)
    assert all("SiglipVisionModel" in v and "Qwen2VisionTransformerPretrainedModel" in v for v in parts.values())


def test_bf16_tower_lora_runs_no_fp32_matrix_product():
    """PEFT keeps a bf16 model's adapters in fp32 and multiplies the tower's bf16 activations cast up
    to fp32 (the fp32 GEMMs of the stock profile); patched, every product in the tower, forward and
    backward, is bf16, while the LoRA weights stay fp32 and get fp32 gradients."""
    from peft import LoraConfig, get_peft_model

    from sftop.kernels import patch_model

    fam = family("gemma3")
    model = fam.tiny_model(seed=2).to(torch.bfloat16)
    targets = target_module_names(model, fam, ["vision", "attention", "mlp"])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    assert patch_model(model, model_type="gemma3_text", only=("lora",)).parts["lora"] == "fused"
    assert patch_towers(model)["vision_qkv_lora"] == "fused"
    vision = model.get_base_model().model.vision_tower
    pixels = _batch()["pixel_values"].to(torch.bfloat16)
    counter = _Count()
    with counter:
        vision(pixel_values=pixels).last_hidden_state.float().square().sum().backward()
    assert counter.matmul_dtypes and set(counter.matmul_dtypes) == {torch.bfloat16}, counter.matmul_dtypes
    lora = {n: p for n, p in vision.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora.values())
    # B starts at zero, so only B's gradients are non-zero on the first step
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if ".lora_B." in n)
