"""Per-family facts the patcher needs: where HF keeps the pieces and which norm form they use.

Only names are recorded here; the patcher looks classes up in the loaded transformers at patch
time, so a transformers release that renames or drops a class makes that part fall back to the
stock path with a reason instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    modeling_module: str  # holds the module-level apply_rotary_pos_emb the attention calls
    norm_class: str
    attention_class: str
    mlp_class: str
    causal_lm_class: str
    gemma_norm: bool = False  # y = x * r * (1 + w) computed in fp32
    # the MLP's output goes straight into the residual add, so a checkpoint's recomputation may
    # skip it (part lean_recompute); Gemma 2/3 normalise it first (post_feedforward_layernorm),
    # and that norm's backward reads it
    mlp_output_unsaved: bool = True
    # q_proj/k_proj/v_proj outputs go straight into RoPE and attention, so a recomputation may
    # hand on placeholders for them when the attention kept q/k/v (part kept_projections);
    # Qwen3 and Gemma 3 normalise q and k first (q_norm/k_norm), whose backward reads them
    qkv_straight_to_rope: bool = True
    # where the family's layers sit under the model (dotted attributes; None: anywhere in it): a
    # vision-language model's tower may use the same class names as its language layers
    layers_at: str | None = None
    # the packed-row attention (part attention) reads 1-D position ids; multimodal RoPE's are 3-D
    packed_attention: bool = True
    # why part attention leaves this family's attention alone, where it does (packed_attention=False)
    packed_attention_refusal: str | None = None


def _spec(model_type: str, module: str, prefix: str, gemma: bool = False, qk_norm: bool = False) -> FamilySpec:
    return FamilySpec(
        model_type=model_type,
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        norm_class=f"{prefix}RMSNorm",
        attention_class=f"{prefix}Attention",
        mlp_class=f"{prefix}MLP",
        causal_lm_class=f"{prefix}ForCausalLM",
        gemma_norm=gemma,
        mlp_output_unsaved=not gemma,
        qkv_straight_to_rope=not qk_norm,
    )


FAMILIES: dict[str, FamilySpec] = {
    s.model_type: s
    for s in (
        _spec("llama", "llama", "Llama"),
        _spec("mistral", "mistral", "Mistral"),
        _spec("qwen2", "qwen2", "Qwen2"),
        _spec("qwen3", "qwen3", "Qwen3", qk_norm=True),
        _spec("gemma2", "gemma2", "Gemma2", gemma=True),
        _spec("gemma3_text", "gemma3", "Gemma3", gemma=True, qk_norm=True),
    )
}


def _multimodal() -> dict[str, FamilySpec]:
    from .families import gemma3, qwen_vl

    return {s.model_type: s for s in (*qwen_vl.SPECS, *gemma3.SPECS)}


# The language layers of vision-language models, by the model's own config model_type. A family
# file under families/ describes them; patch_model uses it for such a model whatever text family
# the caller names (the planner's tables above stay those of text-only models).
MULTIMODAL: dict[str, FamilySpec] = _multimodal()
