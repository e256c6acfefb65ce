"""Put sftop's kernels into a Qwen-VL vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), in place.

Parts (each reported "fused" or "stock: why", like patch_model's):
  * vision_attention: every window and image of a layer in one attention launch
    (sftop/kernels/vision_attention.py), selected through the tower's own config;
  * vision_rope: the tower's 2-D rotary embedding on q and k in one Triton launch (rope.py's kernel:
    HF's version casts q and k to fp32 and back around six elementwise kernels in every layer);
  * vision_rms_norm: Qwen2.5-VL's RMSNorms in the tower and its patch merger as one Triton launch
    each (Qwen2-VL and Qwen3-VL towers use LayerNorm: stock);
  * vision_mlp: Qwen2.5-VL's gated MLP with its activation and product in one Triton launch (glu.py)
    and, where gate and up are plain LoRA layers, their two projections as one shared-input LoRA
    Function (lora_linear.py: the input read and the A products done once);
  * vision_patch_embed: the patch embedding, a Conv3d whose kernel is the whole patch, as the one
    GEMM it is (the convolution path pays cuDNN's setup for a product);
  * vision_graphs: Qwen2.5-VL's blocks replayed from CUDA graphs once an image layout repeats
    (patching/vision_graphs.py; on unless SFTOP_VISION_GRAPHS=0);
  * language_graphs: not a tower part, but the same switch: the model's Qwen2.5-VL language layers
    replayed from CUDA graphs, their gradient handed back to the image embeddings
    (patching/language_graphs.py);
  * image_merge: not a tower part either: the model's image and video features written into the
    token embeddings by row rather than by transformers' masked_scatter, whose prefix sum over
    every element of the embeddings sat at the step's peak (patching/image_merge.py).

Only modules inside a tower are touched; the language model is patch_model's.  As there, module
instances get a new `forward` that calls back into the originals (the same `set_forward`,
patching/forwards.py, so `unpatch` takes these off too), and the rotary hook is a
dispatcher installed once in the modeling module that uses the kernel only while a patched
attention instance runs (also when a checkpoint recomputes it), so other models in the process
keep the stock path.  The tower's LoRA layers are patch_model's `lora` part, which covers every
LoRA layer of the model.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .. import compat
from .._runtime import kernels_available
from . import markers as M
from .forwards import restore_forward, set_forward
from .towers import apply_parts
from .image_merge import patch_image_merge, unpatch_image_merge
from .language_graphs import patch_language_graphs, unpatch_language_graphs
from .vision_graphs import patch_graphs

FUSED = "fused"
# vision_graphs last: it needs vision_attention's one-launch attention in place
# the parts applied per tower
TOWER_PARTS = (
    "vision_attention",
    "vision_rope",
    "vision_rms_norm",
    "vision_mlp",
    "vision_patch_embed",
    "vision_graphs",
)
# the parts applied to the whole model: they take its own modules (language_graphs.py, image_merge.py)
MODEL_PARTS = ("language_graphs", "image_merge")
VISION_PARTS = TOWER_PARTS + MODEL_PARTS

_ATTN_ORIG = M.VISION_ATTN_IMPLEMENTATION
_ROPE_FN = "apply_rotary_pos_emb_vision"


@dataclass(frozen=True)
class TowerSpec:
    modeling_module: str
    attention_class: str
    rms_norm_class: str | None  # None: the tower normalises with LayerNorm
    mlp_class: str | None = None  # a gate/up/down MLP; None: fc1/fc2 (not gated)


TOWERS: dict[str, TowerSpec] = {
    "Qwen2VisionTransformerPretrainedModel": TowerSpec(
        "transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention", None
    ),
    "Qwen2_5_VisionTransformerPretrainedModel": TowerSpec(
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        "Qwen2_5_VLVisionAttention",
        "Qwen2_5_VLRMSNorm",
        "Qwen2_5_VLMLP",
    ),
    "Qwen3VLVisionModel": TowerSpec("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention", None),
}


def find_towers(model: nn.Module) -> list[tuple[nn.Module, TowerSpec]]:
    """The Qwen-VL vision towers inside `model` (a VLM, possibly inside a PeftModel)."""
    return [(m, TOWERS[type(m).__name__]) for m in model.modules() if type(m).__name__ in TOWERS]


def _modules_of(tower: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in tower.modules() if type(m).__name__ == class_name]


# --------------------------------------------------------------------------- vision_attention


def _patch_attention(tower: nn.Module, spec: TowerSpec) -> str:
    from ..varlen_attention import varlen_available
    from ..vision_attention import NAME, register

    if not _modules_of(tower, spec.attention_class):
        return f"stock: no {spec.attention_class} modules found"
    config = tower.config
    current = compat.attn_implementation(config)
    if current == NAME:
        return FUSED
    if current not in ("sdpa", "eager", None):
        return f"stock: the tower's attention is {current!r}, which already takes the segments at once"
    if torch.cuda.is_available():
        ok, why = varlen_available()
        if not ok:
            # the fallback's block-diagonal mask would cost more than the stock loop on a GPU
            return f"stock: {why}"
    register()
    tower.__dict__[_ATTN_ORIG] = current
    compat.set_config_attn_implementation(config, NAME)
    return FUSED


def _restore_attention(tower: nn.Module) -> None:
    if _ATTN_ORIG in tower.__dict__:
        compat.set_config_attn_implementation(tower.config, tower.__dict__.pop(_ATTN_ORIG))


# --------------------------------------------------------------------------- vision_rope

_rope_state = threading.local()


def _rope_active() -> bool:
    return getattr(_rope_state, "depth", 0) > 0


def _install_rope_dispatcher(modeling) -> None:
    original = getattr(modeling, _ROPE_FN)
    if getattr(original, M.ROPE_DISPATCHER, False):
        return
    from ..rope import apply_rope, rope_supported

    def apply_rotary_pos_emb_vision(q, k, cos, sin):
        # q, k: [T, H, D]; cos, sin: [T, D] -> the text kernel's [1, T, H, D] with unsqueeze_dim=2
        if _rope_active() and q.dim() == 3 and k.dim() == 3 and cos.dim() == 2:
            qq, kk, cc, ss = q[None], k[None], cos[None], sin[None]
            if rope_supported(qq.transpose(1, 2), kk.transpose(1, 2), cc, ss):
                qo, ko = apply_rope(qq, kk, cc, ss, unsqueeze_dim=2)
                return qo[0], ko[0]
        return original(q, k, cos, sin)

    setattr(apply_rotary_pos_emb_vision, M.ROPE_DISPATCHER, True)
    setattr(apply_rotary_pos_emb_vision, M.ROPE_ORIGINAL, original)
    setattr(modeling, _ROPE_FN, apply_rotary_pos_emb_vision)


def _rope_scope(self, base, *args, **kwargs):
    _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
    try:
        return base(*args, **kwargs)
    finally:
        _rope_state.depth -= 1


def _patch_rope(tower: nn.Module, spec: TowerSpec) -> str:
    ok, why = kernels_available()
    if not ok:
        return f"stock: {why}"
    try:
        modeling = importlib.import_module(spec.modeling_module)
    except ImportError as exc:
        return f"stock: {spec.modeling_module} not importable ({exc})"
    if not callable(getattr(modeling, _ROPE_FN, None)):
        return f"stock: {spec.modeling_module} has no {_ROPE_FN}"
    mods = _modules_of(tower, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    _install_rope_dispatcher(modeling)
    for m in mods:
        set_forward(m, _rope_scope, "vision_rope")
    return FUSED


# --------------------------------------------------------------------------- vision_rms_norm


def _rms_forward(self, _base, x):
    from ..rms_norm import rms_norm

    return rms_norm(x, self.weight, self.variance_epsilon, False, None)


def _patch_rms_norm(tower: nn.Module, spec: TowerSpec) -> str:
    if spec.rms_norm_class is None:
        return "stock: this tower normalises with LayerNorm"
    ok, why = kernels_available()
    if not ok:
        return f"stock: {why}"
    mods = _modules_of(tower, spec.rms_norm_class)
    if not mods:
        return f"stock: no {spec.rms_norm_class} modules found"
    if not all(isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon") for m in mods):
        return f"stock: {spec.rms_norm_class} without a weight tensor or epsilon"
    for m in mods:
        set_forward(m, _rms_forward, "vision_rms_norm")
    return FUSED


# --------------------------------------------------------------------------- vision_mlp


def _glu_kind(act: nn.Module) -> int | None:
    from ..glu import GEGLU, SWIGLU

    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return SWIGLU
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation") or (
        isinstance(act, nn.GELU) and act.approximate == "tanh"
    ):
        return GEGLU
    return None


def _plain_lora_adapter(layer: nn.Module) -> str | None:
    """The one adapter of a PEFT LoRA layer that lora_linears computes exactly, else None."""
    from .peft_lora import is_lora_layer, lora_refusal

    if not is_lora_layer(layer) or lora_refusal(layer) is not None:
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None
    return list(layer.active_adapters)[0]


def _lora_live(layer: nn.Module, adapter: str) -> bool:
    """PEFT's per-call state still matches what the patch saw (not disabled, merged or switched)."""
    from .peft_lora import lora_state_ok

    return lora_state_ok(layer, adapter)


def _mlp_forward(self, _base, x):
    from ..glu import GLUFunction
    from ..lora_linear import lora_linears

    gate, up = self.gate_proj, self.up_proj
    adapter = self.__dict__.get(M.LORA_MLP_ADAPTER)
    if adapter is not None and _lora_live(gate, adapter) and _lora_live(up, adapter):
        g, u = lora_linears(x, (gate, up), adapter)
    else:
        g, u = gate(x), up(x)
    return self.down_proj(GLUFunction.apply(g, u, self.__dict__[M.GLU]))


def _patch_mlp(tower: nn.Module, spec: TowerSpec) -> str:
    if spec.mlp_class is None:
        return "stock: this tower's MLP is not gated"
    ok, why = kernels_available()
    if not ok:
        return f"stock: {why}"
    mods = _modules_of(tower, spec.mlp_class)
    if not mods:
        return f"stock: no {spec.mlp_class} modules found"
    kinds = [_glu_kind(getattr(m, "act_fn", None)) for m in mods]
    if any(k is None for k in kinds):
        return f"stock: activation {type(mods[kinds.index(None)].act_fn).__name__} has no fused kernel"
    for m, kind in zip(mods, kinds):
        adapters = {_plain_lora_adapter(m.gate_proj), _plain_lora_adapter(m.up_proj)}
        m.__dict__[M.GLU] = kind
        m.__dict__[M.LORA_MLP_ADAPTER] = adapters.pop() if len(adapters) == 1 else None
        set_forward(m, _mlp_forward, "vision_mlp")
    return FUSED


# --------------------------------------------------------------------------- vision_patch_embed


def _patch_embed_forward(self, _base, x):
    w = self.proj.weight
    return torch.nn.functional.linear(
        x.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias
    )


def _patch_patch_embed(tower: nn.Module, spec: TowerSpec) -> str:
    embed = getattr(tower, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, nn.Conv3d) or type(proj) is not nn.Conv3d:  # a subclass (PEFT's) may differ
        return f"stock: the patch embedding is {type(proj).__name__}, not a Conv3d"
    whole_patch = (
        proj.kernel_size == proj.stride
        and proj.padding == (0, 0, 0)
        and proj.dilation == (1, 1, 1)
        and proj.groups == 1
    )
    expected = (
        getattr(embed, "temporal_patch_size", None),
        getattr(embed, "patch_size", None),
        getattr(embed, "patch_size", None),
    )
    if (
        not whole_patch
        or tuple(proj.kernel_size) != expected
        or proj.in_channels != getattr(embed, "in_channels", None)
    ):
        return "stock: the patch embedding's convolution does not cover exactly one patch"
    set_forward(embed, _patch_embed_forward, "vision_patch_embed")
    return FUSED


_PATCHERS = {
    "vision_attention": _patch_attention,
    "vision_rope": _patch_rope,
    "vision_rms_norm": _patch_rms_norm,
    "vision_mlp": _patch_mlp,
    "vision_patch_embed": _patch_patch_embed,
    "vision_graphs": patch_graphs,
}
_MODEL_PATCHERS = {"language_graphs": patch_language_graphs, "image_merge": patch_image_merge}


def patch_vision_tower(model: nn.Module, *, enable: bool = True) -> dict[str, str]:
    """Patch every Qwen-VL vision tower in `model`; returns each part's "fused" or "stock: why".

    `enable=False` puts the stock forwards and attention back."""
    towers = find_towers(model)
    if not enable:
        for tower, _spec in towers:
            for m in tower.modules():
                restore_forward(m)
            _restore_attention(tower)
        unpatch_language_graphs(model)
        unpatch_image_merge(model)
        return {p: "stock: disabled" for p in VISION_PARTS}
    if not towers:
        return {p: f"stock: no vision tower sftop knows (known: {', '.join(sorted(TOWERS))})" for p in VISION_PARTS}
    report = apply_parts(TOWER_PARTS, _PATCHERS, towers)
    report.update(apply_parts(MODEL_PARTS, _MODEL_PATCHERS, [(model,)]))
    return report
