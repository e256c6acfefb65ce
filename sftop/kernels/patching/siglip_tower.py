"""Put sftop's kernels into a SigLIP vision tower (Gemma 3's), in place.

A SigLIP tower takes every image at one square size: a fixed number of patches per image, each
layer LayerNorm -> full (non-windowed, unmasked) attention -> LayerNorm -> fc1, GELU-tanh, fc2.
Parts (each reported "fused" or "stock: why", like patch_model's):
  * vision_attention: the tower's attention through SDPA, which without a mask runs flash
    attention; the eager path's [T, T] scores per head and image are what it replaces.  A tower
    already on SDPA or flash attention has nothing to gain and stays as it is;
  * vision_qkv_lora: q/k/v LoRA layers of each attention block as one shared-input LoRA Function
    (lora_linear.py through part attention_lora's grouping: the input read and the A products done
    once, the frozen bases with their biases inside it);
  * vision_patch_embed: the patch embedding, a Conv2d whose kernel is the whole patch, as the one
    GEMM it is;
  * vision_layer_norm, vision_mlp: stock, with why: torch's LayerNorm and its tanh GELU already
    run as one kernel each way, the MLP is not gated (no GLU kernel applies), and its fc1/fc2 LoRA
    layers already take patch_model's `lora` part, which covers every LoRA layer of the model.

Only modules inside a tower are touched.  Module instances get a new `forward` through the same
`set_forward` as every part (patching/forwards.py), so `unpatch` takes those off too; the attention
implementation goes back with `patch_siglip_tower(model, enable=False)`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from .._runtime import kernels_available
from . import markers as M
from .forwards import FUSED, restore_forward, set_forward
from .registry import FamilySpec
from .towers import apply_parts

SIGLIP_PARTS = ("vision_attention", "vision_qkv_lora", "vision_patch_embed", "vision_layer_norm", "vision_mlp")
TOWER_CLASSES = ("SiglipVisionModel", "SiglipVisionTransformer")
ATTENTION_CLASS = "SiglipAttention"


def find_towers(model: nn.Module) -> list[nn.Module]:
    """The SigLIP vision towers inside `model` (a VLM, possibly inside a PeftModel); a tower nested
    in another (SiglipVisionModel holding a SiglipVisionTransformer in older releases) counts once."""
    towers: list[nn.Module] = []
    for m in model.modules():
        if type(m).__name__ in TOWER_CLASSES and not any(m in set(t.modules()) for t in towers):
            towers.append(m)
    return towers


def _modules_of(tower: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in tower.modules() if type(m).__name__ == class_name]


# --------------------------------------------------------------------------- vision_attention


def _patch_attention(tower: nn.Module) -> str:
    mods = _modules_of(tower, ATTENTION_CLASS)
    if not mods:
        return f"stock: no {ATTENTION_CLASS} modules found"
    if any(getattr(m, "is_causal", False) for m in mods):
        return "stock: causal attention in the tower"
    current = compat.attn_implementation(tower.config)
    if current != "eager":
        return f"stock: the tower's attention is already {current!r} (no mask: flash attention)"
    # SigLIP's vision attention takes no mask and no softcapping: SDPA computes the same softmax
    tower.__dict__[M.VISION_ATTN_IMPLEMENTATION] = current
    compat.set_config_attn_implementation(tower.config, "sdpa")
    return FUSED


def _restore_attention(tower: nn.Module) -> None:
    if M.VISION_ATTN_IMPLEMENTATION in tower.__dict__:
        compat.set_config_attn_implementation(tower.config, tower.__dict__.pop(M.VISION_ATTN_IMPLEMENTATION))


# --------------------------------------------------------------------------- vision_qkv_lora

# the tower's attention blocks as part attention_lora reads a family: by class, anywhere in the tower
_QKV_SPEC = FamilySpec(
    model_type="siglip_vision_model",
    modeling_module="transformers.models.siglip.modeling_siglip",
    norm_class="LayerNorm",
    attention_class=ATTENTION_CLASS,
    mlp_class="SiglipMLP",
    causal_lm_class="",
)


def _patch_qkv_lora(tower: nn.Module) -> str:
    from .parts import attention_lora

    ok, why = kernels_available()
    if not ok:
        return f"stock: {why}"
    # part attention_lora's grouping, over the tower's attention blocks (q_proj, k_proj, v_proj:
    # SigLIP's names; their biases run inside the Function)
    return attention_lora.apply(tower, _QKV_SPEC)


# --------------------------------------------------------------------------- vision_patch_embed


def _patch_embed_forward(self, base, pixel_values, interpolate_pos_encoding=False):
    conv = self.patch_embedding
    p = self.patch_size
    b, c, h, w = pixel_values.shape
    if interpolate_pos_encoding or h % p or w % p or (h // p) * (w // p) != self.num_patches:
        return base(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    weight = conv.weight
    # [B, C, H, W] -> one row per patch, its values in the kernel's (C, p, p) order
    patches = pixel_values.to(weight.dtype).reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    rows = patches.reshape(-1, c * p * p)
    out = nn.functional.linear(rows, weight.reshape(weight.shape[0], -1), conv.bias)
    return out.view(b, -1, weight.shape[0]) + self.position_embedding(self.position_ids)


def _patch_patch_embed(tower: nn.Module) -> str:
    embeds = _modules_of(tower, "SiglipVisionEmbeddings")
    if len(embeds) != 1:
        return f"stock: {len(embeds)} SiglipVisionEmbeddings modules in the tower"
    embed = embeds[0]
    conv = getattr(embed, "patch_embedding", None)
    if not isinstance(conv, nn.Conv2d) or type(conv) is not nn.Conv2d:  # a subclass (PEFT's) may differ
        return f"stock: the patch embedding is {type(conv).__name__}, not a Conv2d"
    p = getattr(embed, "patch_size", None)
    whole_patch = (
        tuple(conv.kernel_size) == (p, p)
        and tuple(conv.stride) == (p, p)
        and conv.padding in ("valid", (0, 0))
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )
    if not whole_patch:
        return "stock: the patch embedding's convolution does not cover exactly one patch"
    if not isinstance(getattr(embed, "position_embedding", None), nn.Embedding) or not torch.is_tensor(
        getattr(embed, "position_ids", None)
    ):
        return "stock: the embeddings have no position table the GEMM path can add"
    set_forward(embed, _patch_embed_forward, "vision_patch_embed")
    return FUSED


# --------------------------------------------------------------------------- stock parts, with why


def _layer_norm(tower: nn.Module) -> str:
    return "stock: torch's LayerNorm is already one fused kernel each way"


def _mlp(tower: nn.Module) -> str:
    return (
        "stock: fc1, GELU-tanh, fc2 is not gated (no GLU kernel applies); torch's GELU is one kernel "
        "each way and fc1/fc2's LoRA layers take part lora"
    )


_PATCHERS = {
    "vision_attention": _patch_attention,
    "vision_qkv_lora": _patch_qkv_lora,
    "vision_patch_embed": _patch_patch_embed,
    "vision_layer_norm": _layer_norm,
    "vision_mlp": _mlp,
}


def patch_siglip_tower(model: nn.Module, *, enable: bool = True) -> dict[str, str]:
    """Patch every SigLIP tower in `model`; returns each part's "fused" or "stock: why".

    `enable=False` puts the stock forwards and attention back."""
    towers = find_towers(model)
    if not enable:
        for tower in towers:
            for m in tower.modules():
                restore_forward(m)
            _restore_attention(tower)
        return {p: "stock: disabled" for p in SIGLIP_PARTS}
    if not towers:
        return {p: f"stock: no SigLIP tower ({', '.join(TOWER_CLASSES)})" for p in SIGLIP_PARTS}
    return apply_parts(SIGLIP_PARTS, _PATCHERS, [(tower,) for tower in towers])
