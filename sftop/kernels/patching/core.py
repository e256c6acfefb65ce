"""patch_model and the parts it can patch (rms_norm, rope, mlp, lora, attention_lora, attention, loss,
lean_recompute, checkpoint_offload, kept_projections, cuda_graphs)."""

from __future__ import annotations

import importlib
import threading
import types
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import compat
from .._runtime import kernels_available
from ..env import env_flag
from .registry import FAMILIES, FamilySpec

PARTS = ("rms_norm", "rope", "mlp", "lora", "attention_lora", "attention", "loss", "lean_recompute",
         "checkpoint_offload", "kept_projections", "cuda_graphs")
FUSED = "fused"

# Marks on patched instances: the forward we replaced (None when the instance had no forward of
# its own, i.e. it used the class method), our wrapper, the part function it calls, and an "off"
# switch for when someone else has wrapped the forward on top of ours.
_ORIG = "_sftop_orig_forward"
_FWD = "_sftop_forward"
_FN = "_sftop_fn"
_OFF = "_sftop_off"
_PART = "_sftop_part"
_GRAPHS = "_sftop_graphs"
_OFFLOADING = "_sftop_offloading"
_GC_MODE = "_sftop_gc_mode"
# set to get the logits back from a training forward (the fused loss returns logits=None)
RETURN_LOGITS_ENV = "SFTOP_RETURN_LOGITS"


@dataclass
class PatchReport:
    family: str
    parts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def any_fused(self) -> bool:
        return any(v == FUSED for v in self.parts.values())


# --------------------------------------------------------------------------- helpers


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The HF PreTrainedModel under a PeftModel (or the model itself)."""
    if type(model).__module__.startswith("peft") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _set_forward(module: nn.Module, fn, part: str) -> None:
    d = module.__dict__
    d[_FN] = fn
    d[_PART] = part
    d[_OFF] = False
    if _ORIG in d:
        if d.get("forward") is not d.get(_FWD):
            # another library (TRL's fused LM head, say) wrapped our wrapper: it keeps calling
            # ours, which now runs `fn` again; nothing to re-install
            return
        original = d[_ORIG]
    else:
        original = d.get("forward")
        d[_ORIG] = original
    base = original if original is not None else types.MethodType(type(module).forward, module)

    def wrapper(self, *a, **k):
        if self.__dict__.get(_OFF):
            return base(*a, **k)
        return self.__dict__[_FN](self, base, *a, **k)

    module.forward = types.MethodType(wrapper, module)
    d[_FWD] = module.forward


def _restore_forward(module: nn.Module) -> None:
    d = module.__dict__
    if _ORIG not in d:
        return
    if d.get("forward") is not d.get(_FWD):
        # someone else's forward sits on top and calls ours: removing ours would drop theirs,
        # so ours becomes a pass-through instead
        d[_OFF] = True
        return
    original = d.pop(_ORIG)
    for key in (_FWD, _FN, _OFF, _PART, "forward", "_sftop_glu", "_sftop_lora_adapter", "_sftop_adapter",
                "_sftop_loss_dtype", "_sftop_direct", "_sftop_qkv", _GRAPHS):
        d.pop(key, None)
    if original is not None:
        module.forward = original


def _modules_of(model: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name]


# --------------------------------------------------------------------------- rms_norm


def _patch_rms_norm(model: nn.Module, spec: FamilySpec) -> str:
    from ..rms_norm import rms_norm

    mods = _modules_of(model, spec.norm_class)
    if not mods:
        return f"stock: no {spec.norm_class} modules found"
    gemma = spec.gemma_norm
    # prepare_model_for_kbit_training leaves norms (and so the residual stream) in fp32; HF then
    # hands fp32 activations to every consumer, which runs SDPA on its fp32 math path (full
    # [T, T] scores) and the LoRA GEMMs without tensor cores.  The quantised linears cast their
    # input to the compute dtype anyway, so on k-bit models the norms emit that dtype; the
    # residual stream itself stays fp32.
    out_dtype = _quantised_compute_dtype(model)

    def forward(self, _orig, x):
        eps = getattr(self, "variance_epsilon", None)
        if eps is None:
            eps = self.eps
        return rms_norm(x, self.weight, eps, gemma, out_dtype)

    for m in mods:
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            return f"stock: {spec.norm_class} without a weight tensor"
    for m in mods:
        _set_forward(m, forward, "rms_norm")
    return FUSED


# --------------------------------------------------------------------------- rope

_rope_state = threading.local()


def _rope_active() -> bool:
    return getattr(_rope_state, "depth", 0) > 0


def _install_rope_dispatcher(modeling) -> None:
    original = compat.rope_function(modeling)
    if getattr(original, "_sftop_dispatcher", False):
        return
    from ..rope import apply_rope, rope_supported

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args and isinstance(args[-1], int) else 1)
        if _rope_active() and unsqueeze_dim in (1, 2):
            qq, kk = (q, k) if unsqueeze_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
            if rope_supported(qq, kk, cos, sin):
                return apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._sftop_dispatcher = True
    apply_rotary_pos_emb._sftop_original = original
    compat.set_rope_function(modeling, apply_rotary_pos_emb)


def _patch_rope(model: nn.Module, spec: FamilySpec) -> str:
    try:
        modeling = importlib.import_module(spec.modeling_module)
    except ImportError as exc:
        return f"stock: {spec.modeling_module} not importable ({exc})"
    if compat.rope_function(modeling) is None:
        return f"stock: {spec.modeling_module} has no {compat.ROPE_FUNCTION}"
    mods = _modules_of(model, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    _install_rope_dispatcher(modeling)

    def forward(self, orig, *args, **kwargs):
        _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
        try:
            return orig(*args, **kwargs)
        finally:
            _rope_state.depth -= 1

    for m in mods:
        _set_forward(m, forward, "rope")
    return FUSED


# --------------------------------------------------------------------------- mlp


def _glu_kind(act: nn.Module) -> int | None:
    """Which fused activation reproduces `act` exactly, by class (names differ across HF releases)."""
    from ..glu import GEGLU, SWIGLU

    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return SWIGLU
    # GELUTanh is gelu_pytorch_tanh; NewGELUActivation (gelu_new) is the same tanh formula
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation") or (
        isinstance(act, nn.GELU) and act.approximate == "tanh"
    ):
        return GEGLU
    return None


def _lora_mlp_refusal(mlp: nn.Module) -> str | None:
    """Why this MLP can't take the one-Function LoRA path (it then keeps the fused activation)."""
    projs = [getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(_is_lora_layer(p) for p in projs):
        return "gate/up/down are not all PEFT LoRA layers"
    for p in projs:
        why = _lora_refusal(p)
        if why:
            return why
    if len({p.active_adapters[0] for p in projs}) != 1:
        return "different adapters on gate/up/down"
    for p in projs:
        why = _base_refusal(p.base_layer, allow_bias=False)
        if why:
            return why
    return None


def _base_refusal(base: nn.Module, allow_bias: bool) -> str | None:
    """Why a LoRA layer's base can't be multiplied directly (dense or NF4 weight, frozen)."""
    if type(base).__name__ not in ("Linear", "Linear4bit") or not isinstance(getattr(base, "weight", None), torch.Tensor):
        return f"base layer {type(base).__name__}"
    if not allow_bias and getattr(base, "bias", None) is not None:
        return "base layer has a bias"
    if base.weight.requires_grad:
        return "base weights are trainable"
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) and getattr(
        base.weight, "quant_state", None
    ) is None:
        return f"base weight dtype {base.weight.dtype}"
    return None


def _mlp_forward(self, _orig, x):
    from ..glu import GLUFunction
    from ..lora_mlp import lora_mlp

    adapter = self.__dict__.get("_sftop_lora_adapter")
    if adapter is not None:
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        # PEFT's per-call state (disabled, merged, switched adapter) sends us down the module path
        if all(not p.disable_adapters and not p.merged and list(p.active_adapters) == [adapter] for p in projs):
            return lora_mlp(x, *projs, self._sftop_glu, adapter)
    return self.down_proj(GLUFunction.apply(self.gate_proj(x), self.up_proj(x), self._sftop_glu))


def _patch_mlp(model: nn.Module, spec: FamilySpec) -> str:
    mods = _modules_of(model, spec.mlp_class)
    if not mods:
        return f"stock: no {spec.mlp_class} modules found"
    kinds = []
    for m in mods:
        if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"stock: {spec.mlp_class} is not a gate/up/down MLP"
        kind = _glu_kind(m.act_fn)
        if kind is None:
            return f"stock: activation {type(m.act_fn).__name__} has no fused kernel"
        kinds.append(kind)
    for m, kind in zip(mods, kinds):
        m._sftop_glu = kind
        m.__dict__["_sftop_lora_adapter"] = (
            m.gate_proj.active_adapters[0] if _lora_mlp_refusal(m) is None else None
        )
        _set_forward(m, _mlp_forward, "mlp")
    return FUSED


# --------------------------------------------------------------------------- loss


def _loss_forward(self, orig, *args, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..fused_linear_cross_entropy import fused_linear_cross_entropy

    labels = kwargs.get("labels")
    shift_labels = kwargs.get("shift_labels")
    # Paths that need the stock forward: no labels (generation, metrics), TRL's own fused LM head
    # (it wants per-token log-probs, not a loss), positional calls we can't map safely, and an
    # explicit request for logits.
    if (
        (labels is None and shift_labels is None)
        or kwargs.get("fused_lm_head")
        or len(args) > 1
        or env_flag(RETURN_LOGITS_ENV, default=False)
    ):
        return orig(*args, **kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    kwargs.pop("labels", None)
    kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    ignore_index = kwargs.pop("ignore_index", -100)

    if shift_labels is None:
        # as HF: token t predicts label t+1; the last position predicts nothing
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    graphs = self.__dict__.get(_GRAPHS)
    if graphs is not None:
        loss = _graphed_loss(self, graphs, kwargs, shift_labels, num_items, ignore_index)
        if loss is not None:
            result = CausalLMOutputWithPast(loss=loss, logits=None)
            return result.to_tuple() if return_dict is False else result
    backbone = getattr(self, self.base_model_prefix)
    out = backbone(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = fused_linear_cross_entropy(
        hidden, head.weight, shift_labels.to(hidden.device),
        num_items_in_batch=num_items, ignore_index=ignore_index, softcap=softcap,
        compute_dtype=getattr(self, "_sftop_loss_dtype", None),
    )
    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
    return result.to_tuple() if return_dict is False else result


def _patch_loss(model: nn.Module, spec: FamilySpec) -> str:
    if type(model).__name__ != spec.causal_lm_class:
        return f"stock: {type(model).__name__} is not {spec.causal_lm_class}"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        # PEFT-wrapped or quantised heads have no plain weight to multiply by
        return f"stock: lm_head is {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "stock: lm_head has a bias"
    if not isinstance(getattr(model, model.base_model_prefix, None), nn.Module):
        return f"stock: no backbone at .{model.base_model_prefix}"
    model._sftop_loss_dtype = _quantised_compute_dtype(model)
    _set_forward(model, _loss_forward, "loss")
    return FUSED


def _quantised_compute_dtype(model: nn.Module):
    """The bitsandbytes compute dtype of a k-bit model, else None.

    prepare_model_for_kbit_training leaves lm_head and the residual stream in fp32, which makes
    the head matmul an fp32 (non-tensor-core) GEMM over the whole vocabulary -- the largest single
    cost of a QLoRA step.  The quantised layers already compute in this dtype, so the fused loss
    runs its two head matmuls in it too (the softmax and loss stay fp32).
    """
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    if not (get("load_in_4bit", False) or get("load_in_8bit", False)):
        return None
    dt = get("bnb_4bit_compute_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt.replace("torch.", ""), None)
    return dt if isinstance(dt, torch.dtype) and dt != torch.float32 else None


# --------------------------------------------------------------------------- lora


def _is_lora_layer(m: nn.Module) -> bool:
    return compat.is_peft_lora_layer(m)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_lora_layer(m)]


def _lora_refusal(m: nn.Module) -> str | None:
    """Why this LoRA layer must keep PEFT's own forward, or None when the fast path is exact."""
    active = list(getattr(m, "active_adapters", []))
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    if name not in m.lora_A:
        return "adapter not on this layer"
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        return "DoRA or another LoRA variant"
    if not isinstance(m.lora_dropout[name], nn.Identity):
        return "LoRA dropout > 0"
    if m.lora_A[name].bias is not None or m.lora_B[name].bias is not None:
        return "LoRA bias"
    if type(m.lora_A[name]) is not nn.Linear or type(m.lora_B[name]) is not nn.Linear:
        return f"LoRA matrices are {type(m.lora_A[name]).__name__}"
    return None


def _lora_state_ok(m: nn.Module, adapter: str) -> bool:
    """False when PEFT decides something per call (disabled or merged adapters, a switched adapter)."""
    active = m.active_adapters
    return not m.disable_adapters and not m.merged and len(active) == 1 and active[0] == adapter


def _lora_forward(self, orig, x, *args, **kwargs):
    # anything PEFT decides per call (mixed adapter batches, disabled or merged adapters, a
    # switched adapter) goes back to PEFT
    if kwargs.get("adapter_names") is not None or not _lora_state_ok(self, self._sftop_adapter):
        return orig(x, *args, **kwargs)
    name = self._sftop_adapter
    if self.__dict__.get("_sftop_direct") and not args and not kwargs:
        from ..lora_linear import lora_linears

        return lora_linears(x, (self,), name)
    result = self.base_layer(x, *args, **kwargs)
    a, b, scale = compat.lora_weights(self, name)
    # PEFT keeps adapters in fp32 and runs them (and the residual add) in fp32 without tensor
    # cores; the adapter product is computed here in the base layer's compute dtype instead, and
    # scale-and-add folds into one addmm when dtypes line up.
    dt = getattr(self.base_layer, "compute_dtype", None) or result.dtype
    xa = x.to(dt) @ a.to(dt).t()
    b_t = b.to(dt).t()
    if result.dtype == dt:
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), b_t, alpha=scale)
        return flat.view(result.shape)
    return result + (xa @ b_t) * scale


def _patch_lora(model: nn.Module, spec: FamilySpec) -> str:
    layers = _lora_layers(model)
    if not layers:
        return "stock: no PEFT LoRA layers"
    refusals = {}
    for m in layers:
        why = _lora_refusal(m)
        if why:
            refusals[why] = refusals.get(why, 0) + 1
    if refusals:
        why, n = max(refusals.items(), key=lambda kv: kv[1])
        return f"stock: {why} ({n} of {len(layers)} layers)"
    for m in layers:
        m._sftop_adapter = m.active_adapters[0]
        # a dense or NF4 frozen base runs inside LoRALinearFunction (one Function, x read once);
        # anything else (8-bit, trainable base) keeps the base layer's own forward
        m.__dict__["_sftop_direct"] = _base_refusal(m.base_layer, allow_bias=True) is None
        _set_forward(m, _lora_forward, "lora")
    return FUSED


# --------------------------------------------------------------------------- attention_lora


class _QKVGroup:
    """q/k/v LoRA layers of one attention block.  HF's attention calls q_proj(x), k_proj(x) and
    v_proj(x) on the same tensor; the first call computes all three in one LoRAQKVFunction and
    leaves the other two outputs here, each handed out once to its own layer when that layer is
    called with the very same tensor object.  Any other call computes afresh, so a stale entry can
    never be returned for a different input.  `keep_projections` (part kept_projections): inside
    an offloading checkpoint, open a holder the attention fills with q/k/v for the recomputation."""

    __slots__ = ("layers", "adapter", "x", "pending", "keep_projections")

    def __init__(self, layers, adapter):
        self.layers, self.adapter, self.x, self.pending = layers, adapter, None, {}
        self.keep_projections = False


def _qkv_forward(self, orig, x, *args, **kwargs):
    grp = self.__dict__["_sftop_qkv"]
    if args or kwargs or not all(_lora_state_ok(m, grp.adapter) for m in grp.layers):
        grp.x, grp.pending = None, {}
        return _lora_forward(self, orig, x, *args, **kwargs)
    if grp.x is x and id(self) in grp.pending:
        out = grp.pending.pop(id(self))
        if not grp.pending:
            grp.x = None
        return out
    from ..lora_linear import lora_linears
    from ..recompute import open_kept_projections

    # only with the fused RoPE, which passes the recomputation's placeholders on uncomputed
    kept = open_kept_projections() if grp.keep_projections and _rope_active() else None
    outs = lora_linears(x, grp.layers, grp.adapter, kept=kept)
    grp.x = x
    grp.pending = {id(m): o for m, o in zip(grp.layers, outs) if m is not self}
    return outs[[m is self for m in grp.layers].index(True)]


def _qkv_refusal(attn: nn.Module) -> str | None:
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(p is not None and _is_lora_layer(p) for p in projs):
        return "q/k/v are not all PEFT LoRA layers"
    for p in projs:
        why = _lora_refusal(p) or _base_refusal(p.base_layer, allow_bias=True)
        if why:
            return why
    if len({p.active_adapters[0] for p in projs}) != 1:
        return "different adapters on q/k/v"
    if len({p.base_layer.weight.shape[-1] for p in projs if getattr(p.base_layer.weight, "quant_state", None) is None}) > 1:
        return "q/k/v have different input sizes"
    return None


def _patch_attention_lora(model: nn.Module, spec: FamilySpec) -> str:
    mods = _modules_of(model, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    refusals = {}
    for m in mods:
        why = _qkv_refusal(m)
        if why:
            refusals[why] = refusals.get(why, 0) + 1
    if refusals:
        why, n = max(refusals.items(), key=lambda kv: kv[1])
        return f"stock: {why} ({n} of {len(mods)} attention blocks)"
    for m in mods:
        layers = (m.q_proj, m.k_proj, m.v_proj)
        grp = _QKVGroup(layers, m.q_proj.active_adapters[0])
        for p in layers:
            p._sftop_adapter = grp.adapter
            p.__dict__["_sftop_direct"] = True
            p.__dict__["_sftop_qkv"] = grp
            _set_forward(p, _qkv_forward, "attention_lora")
    return FUSED


# --------------------------------------------------------------------------- attention (packed rows)

_ATTN_ORIG = "_sftop_attn_implementation"


def _patch_attention(model: nn.Module, spec: FamilySpec) -> str:
    """Switch SDPA to flash attention over row boundaries for padding-free batches (see
    sftop/kernels/varlen_attention.py); everything else keeps running through SDPA."""
    from ..varlen_attention import NAME, config_supported, register, varlen_available

    config = model.config
    current = compat.attn_implementation(config)
    if current == NAME:
        return FUSED
    if current != "sdpa":
        return f"stock: attention is {current!r}; only SDPA is replaced"
    ok, why = varlen_available()
    if not ok:
        return f"stock: {why}"
    mods = _modules_of(model, spec.attention_class)
    if not mods:
        return f"stock: no {spec.attention_class} modules found"
    dtype = _quantised_compute_dtype(model) or getattr(model, "dtype", None)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    ok, why = config_supported(config, names.get(dtype, str(dtype)))
    if not ok:
        return f"stock: {why}"
    for m in mods:  # what the config says, checked where it is used
        if getattr(m, "sliding_window", None) or getattr(m, "attention_dropout", 0.0) or not getattr(m, "is_causal", True):
            return "stock: sliding-window, dropout or non-causal attention in a layer"
    register()
    model.__dict__[_ATTN_ORIG] = current
    model.set_attn_implementation(NAME)
    return FUSED


def _restore_attention(model: nn.Module) -> None:
    original = model.__dict__.pop(_ATTN_ORIG, None)
    if original is not None:
        model.set_attn_implementation(original)


# --------------------------------------------------------------------------- lean_recompute, checkpoint_offload

_GC_ENABLE = "gradient_checkpointing_enable"
_LEAN = "_sftop_lean_recompute"
_OFFLOAD_OK = "_sftop_offload_ok"


def _layer_checkpoint_function(stock_fn, gc_kwargs: dict, lean: bool, overlapped: bool):
    """The `_gradient_checkpointing_func` for the decoder layers: transformers' own (`stock_fn`) or
    torch's non-reentrant checkpoint with overlapped offload of the saved inputs, optionally telling
    the kernels when they run as a recomputation (sftop/kernels/recompute.py)."""
    import functools

    from ..checkpoint_offload import checkpoint_function
    from ..recompute import checkpoint_marking_recompute

    inner = checkpoint_function(gc_kwargs) if overlapped else stock_fn
    if not lean:
        return inner
    # with offload, the first run can move large tensors for its recomputation along with the
    # layer input (the attention output: sftop/kernels/kept_attention.py)
    hooks = inner.keywords["_offload"] if overlapped else None
    return functools.partial(checkpoint_marking_recompute, _checkpoint=inner, _offload=hooks)


def _install_checkpointing(model: nn.Module) -> None:
    """Wrap the model's `gradient_checkpointing_enable` (what Trainer calls) so that the layers get
    `_layer_checkpoint_function` when the parts that need it are on.  Idempotent."""
    if _GC_ENABLE in model.__dict__:
        return
    original = getattr(model, _GC_ENABLE)

    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, every_n_layers: int = 1,
                                      offload: bool = False):
        gc_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        # reentrant checkpointing saves nothing through autograd's hooks and recomputes inside
        # its own backward: neither of our changes applies to it
        ours = gc_kwargs.get("use_reentrant", True) is False
        overlapped = ours and offload and model.__dict__.get(_OFFLOAD_OK, False)
        lean = ours and model.__dict__.get(_LEAN, False)
        with warnings.catch_warnings():
            # transformers >= 5.23 routes activation_checkpointing_enable through this override and
            # calls the old name deprecated: the wrapper is the only hook there is, not a user's choice
            warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_enable` is deprecated",
                                    category=FutureWarning)
            original(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, every_n_layers=every_n_layers,
                     offload=offload and not overlapped)
        # transformers' blocking offload allocates pinned memory per tensor: not capturable
        model.__dict__[_OFFLOADING] = bool(offload and not overlapped)
        model.__dict__[_GC_MODE] = (lean, overlapped)  # part of a captured step's key
        if overlapped or lean:
            fns = {}  # one function for all layers: the offload hooks chain the saved inputs
            for m in model.modules():
                stock_fn = compat.checkpoint_function(m)
                if stock_fn is not None:
                    if id(stock_fn) not in fns:
                        fns[id(stock_fn)] = _layer_checkpoint_function(stock_fn, gc_kwargs, lean, overlapped)
                    compat.set_checkpoint_function(m, fns[id(stock_fn)])

    model.__dict__[_GC_ENABLE] = gradient_checkpointing_enable


def _patch_lean_recompute(model: nn.Module, spec: FamilySpec) -> str:
    """Under gradient checkpointing, let the fused LoRA MLP skip its down projection when a layer is
    recomputed for backward: that output is never used (sftop/kernels/recompute.py)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"stock: {type(model).__name__} does not support gradient checkpointing"
    if not spec.mlp_output_unsaved:
        return f"stock: {spec.model_type} normalises the MLP output, so backward needs it"
    if not any(m.__dict__.get("_sftop_lora_adapter") for m in _modules_of(model, spec.mlp_class)):
        return "stock: needs the fused LoRA MLP (mlp part with LoRA on gate, up and down)"
    model.__dict__[_LEAN] = True
    _install_checkpointing(model)
    return FUSED


def _patch_checkpoint_offload(model: nn.Module, spec: FamilySpec) -> str:
    """Make `gradient_checkpointing_enable(offload=True)` (what Trainer calls for sftop's "offload"
    plan) use the copy-overlapping offload of sftop/kernels/checkpoint_offload.py instead of
    transformers' save_on_cpu, which blocks on every copy."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"stock: {type(model).__name__} does not support gradient checkpointing"
    if not torch.cuda.is_available():
        return "stock: offloading to host memory needs a CUDA GPU"
    model.__dict__[_OFFLOAD_OK] = True
    _install_checkpointing(model)
    return FUSED


def _patch_kept_projections(model: nn.Module, spec: FamilySpec) -> str:
    """Under offloaded lean checkpointing, let each layer's first run keep its attention's q/k/v in
    host memory, so that the recomputation skips the q/k/v projections and RoPE (recompute.py
    KeptProjections): on layers whose compute hides the extra copies."""
    from ..constants import KEEP_PROJECTIONS_ENV as ENV_SWITCH
    from ..constants import projections_worth_keeping

    if not spec.qkv_straight_to_rope:
        return f"stock: {spec.model_type} normalises q and k before RoPE, and that backward reads them"
    if not model.__dict__.get(_LEAN):
        return "stock: needs lean_recompute"
    mods = _modules_of(model, spec.attention_class)
    groups = [getattr(m, "q_proj", None) and m.q_proj.__dict__.get("_sftop_qkv") for m in mods]
    if not mods or not all(groups):
        return "stock: needs the fused q/k/v LoRA projections (part attention_lora)"
    if not all(m.__dict__.get(_PART) == "rope" for m in mods):
        return "stock: needs the fused RoPE (part rope)"
    config = model.config
    q, kv = mods[0].q_proj.base_layer, mods[0].k_proj.base_layer
    intermediate = getattr(config, "intermediate_size", None)
    if not intermediate:
        return "stock: the config gives no intermediate_size"
    if not projections_worth_keeping(q.in_features, intermediate, q.out_features, kv.out_features):
        return f"stock: layers too narrow to hide the extra copies under their compute ({ENV_SWITCH}=1 forces it)"
    if not model.__dict__.get(_OFFLOAD_OK):
        return "stock: needs checkpoint_offload"
    for grp in groups:
        grp.keep_projections = True
    return FUSED


# --------------------------------------------------------------------------- cuda_graphs


def _patch_cuda_graphs(model: nn.Module, spec: FamilySpec) -> str:
    """Replay the step's model part from CUDA graphs when a batch shape repeats (see
    sftop/kernels/cuda_graphs.py); the fused loss's forward decides per call."""
    from ..cuda_graphs import ENV_SWITCH, StepGraphs, enabled_by_env, no_rng_stash

    if not enabled_by_env():
        return f"stock: turned off by {ENV_SWITCH}=0"
    if not torch.cuda.is_available():
        return "stock: CUDA graphs need a CUDA GPU"
    if model.__dict__.get(_PART) != "loss":
        return "stock: needs the fused loss part"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "stock: not under multi-process training"
    why = _randomness(model)
    if why:
        return f"stock: {why} (a replayed graph would reuse one random mask)"
    if _GRAPHS not in model.__dict__:
        model.__dict__[_GRAPHS] = StepGraphs(no_rng_stash(model))
    return FUSED


def _randomness(model: nn.Module) -> str | None:
    for k, v in model.config.to_dict().items():
        if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return f"{k}={v}"
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"dropout p={m.p} in {type(m).__name__}"
    return None


def _graphed_loss(self, graphs, kwargs, shift_labels, num_items, ignore_index):
    """The loss from the captured step, or None for the eager path: not training, a batch that is
    not plain token ids (packing's position ids, embeddings, caches), padding, transformers' own
    (blocking) offload of the checkpoints."""
    ids = kwargs.get("input_ids")
    if not (self.training and torch.is_grad_enabled()) or not torch.is_tensor(ids) or not ids.is_cuda:
        return None
    if self.__dict__.get(_OFFLOADING):
        return None
    for k, v in kwargs.items():
        if v is None or k == "input_ids" or (k == "use_cache" and not v):
            continue
        if k == "attention_mask" and torch.is_tensor(v) and v.shape == ids.shape:
            continue
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):  # one host sync: padded batches run eagerly
        return None
    slots = [(m, name, p) for m in self.modules() for name, p in m._parameters.items() if p is not None]
    trainable = [slot for slot in slots if slot[2].requires_grad]
    if not trainable:
        return None
    labels = shift_labels.to(ids.device)
    key = (
        tuple(ids.shape), ids.dtype, tuple(labels.shape), labels.dtype, ignore_index,
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
        bool(getattr(self, "is_activation_checkpointing", None) if hasattr(type(self), "is_activation_checkpointing")
             else getattr(self, "is_gradient_checkpointing", False)), self.__dict__.get(_GC_MODE),
        tuple((p.data_ptr(), p.requires_grad) for _m, _n, p in slots),
    )
    from ..fused_linear_cross_entropy import fused_linear_cross_entropy

    backbone = getattr(self, self.base_model_prefix)
    weight = self.get_output_embeddings().weight
    softcap = getattr(self.config, "final_logit_softcapping", None)
    one = graphs.unit(ids.device)
    loss_dtype = getattr(self, "_sftop_loss_dtype", None)

    def loss_sum(ids_, labels_):
        # all ones: see cuda_graphs.causal_masks_skipped
        out = backbone(input_ids=ids_, attention_mask=torch.ones_like(ids_), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return fused_linear_cross_entropy(hidden, weight, labels_, num_items_in_batch=one, ignore_index=ignore_index,
                                          softcap=softcap, compute_dtype=loss_dtype, select_rows=False)

    total = graphs.loss_sum(key, loss_sum, (ids, labels), trainable)
    if total is None:
        return None
    if num_items is None:
        return total / (labels != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(num_items):
        return total / num_items.to(device=total.device, dtype=torch.float32)
    return total / float(num_items)


_PATCHERS = {
    "rms_norm": _patch_rms_norm, "rope": _patch_rope, "mlp": _patch_mlp, "lora": _patch_lora,
    "attention_lora": _patch_attention_lora, "attention": _patch_attention, "loss": _patch_loss,
    "lean_recompute": _patch_lean_recompute, "checkpoint_offload": _patch_checkpoint_offload,
    "kept_projections": _patch_kept_projections, "cuda_graphs": _patch_cuda_graphs,
}


def _unpatch(model: nn.Module) -> None:
    for m in model.modules():
        _restore_forward(m)
    _restore_attention(model)
    for key in (_GC_ENABLE, _OFFLOADING, _GC_MODE, _LEAN, _OFFLOAD_OK):
        model.__dict__.pop(key, None)


def patch_model(model: nn.Module, *, enable: bool = True, model_type: str | None = None,
                only: tuple[str, ...] | None = None) -> PatchReport:
    """Patch `model` (an HF causal LM, possibly inside a PeftModel) in place with the fused kernels.

    Returns which parts were fused and, for the others, why they stayed stock.  `enable=False`
    removes any earlier patch from this model and reports every part as stock.

    A vision-language model names its text layers' family in `model_type` (its own config's
    model_type names the whole model): the parts find those layers by class name wherever they
    sit. `only` limits patching to those parts; the others stay stock with that reason.
    """
    base = _unwrap_peft(model)
    config = getattr(base, "config", None)
    family = model_type or getattr(config, "model_type", None) or type(base).__name__
    if not enable:
        _unpatch(base)
        return PatchReport(family, {p: "stock: disabled" for p in PARTS})
    ok, why = kernels_available()
    if not ok:
        return PatchReport(family, {p: f"stock: {why}" for p in PARTS})
    spec = FAMILIES.get(family)
    if spec is None:
        why = f"family '{family}' not supported (supported: {', '.join(sorted(FAMILIES))})"
        return PatchReport(family, {p: f"stock: {why}" for p in PARTS})
    parts = {}
    for part in PARTS:
        if only is not None and part not in only:
            parts[part] = "stock: not applied to this model (see its kernels report)"
            continue
        try:
            parts[part] = _PATCHERS[part](base, spec)
        except Exception as exc:  # noqa: BLE001 - a part that can't be applied must not take the others down
            parts[part] = f"stock: patch failed ({type(exc).__name__}: {exc})"
    return PatchReport(family, parts)
