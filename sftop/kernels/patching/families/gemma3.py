"""The language layers of Gemma 3's vision-language model (Gemma3ForConditionalGeneration,
transformers 5).

They are Gemma 3's text layers (`Gemma3RMSNorm` with its (1 + w) weight, q/k norms,
`Gemma3Attention`, the gelu-tanh `Gemma3MLP`) at `model.language_model`.  The multimodal projector
normalises with the same `Gemma3RMSNorm` class, so every part looks only under the language model.

RoPE: the model's rotary embedding computes cos/sin per layer type (local base for the sliding
layers, global base for the full ones) and each attention calls its modeling module's
`apply_rotary_pos_emb(q, k, cos, sin)` with the cos/sin of its own type: the kernel takes them as
given, so both bases reach it unchanged.

Attention is not causal-only: the processor marks image tokens in `token_type_ids`, and the model
builds a mask in which the tokens of one image see each other both ways (inside the sliding window
on the local layers).  The packed-row attention (part attention) assumes causal rows, so it is
refused here with that reason and the layers keep transformers' attention with that mask; every
other part is exact under any mask.  The loss part replaces the `...ForConditionalGeneration`
forward: its backbone (`model`) takes the pixel values and `token_type_ids` as they come and
builds that mask itself; the stock head applies no logit softcapping, nor does the fused loss (the
outer config has no `final_logit_softcapping`).
"""

from __future__ import annotations

from ..registry import FamilySpec

NOT_CAUSAL = (
    "Gemma 3's image tokens attend to each other both ways (token_type_ids), which causal packed "
    "attention cannot do: transformers' attention runs with that mask"
)

SPECS = (
    FamilySpec(
        model_type="gemma3",
        modeling_module="transformers.models.gemma3.modeling_gemma3",
        norm_class="Gemma3RMSNorm",
        attention_class="Gemma3Attention",
        mlp_class="Gemma3MLP",
        causal_lm_class="Gemma3ForConditionalGeneration",
        gemma_norm=True,
        mlp_output_unsaved=False,
        qkv_straight_to_rope=False,
        layers_at="model.language_model",
        packed_attention=False,
        packed_attention_refusal=NOT_CAUSAL,
    ),
)
