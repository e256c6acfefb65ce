"""The language layers of Qwen2-VL and Qwen2.5-VL (transformers 5).

They are Qwen2's decoder layers under the VLM's own class names: `Qwen2VLRMSNorm` /
`Qwen2_5_VLRMSNorm`, `Qwen2VLAttention` / `Qwen2_5_VLAttention`, and Qwen2's `Qwen2MLP`, at
`model.language_model`.  The vision tower uses the same RMSNorm class (Qwen2.5-VL's blocks and
merger), so every part looks only under the language model.

Multimodal RoPE (`mrope_section`) is folded into cos/sin by the model's rotary embedding: the
attention calls its modeling module's `apply_rotary_pos_emb(q, k, cos, sin)` with cos/sin of
[batch, tokens, head_dim], the form the RoPE kernel takes.  The rotary position ids are 3-D
(time, height, width, from `mm_token_type_ids` and the image grids); a packed row
(sftop/engine/models/vision/packing.py) puts a fourth row of text positions, restarting per
sample, in front of them, and the text model hands that row to its layers as `position_ids`: the
packed-row attention part (varlen_attention.py) reads the samples' boundaries from it, in the
language model only (`varlen_attention.packed_attention_config`).  The loss part replaces the
`...ForConditionalGeneration` forward: its backbone (`model`) takes the pixel values and grids as
they come.
"""

from __future__ import annotations

from ..registry import FamilySpec


def _spec(model_type: str, module: str, prefix: str) -> FamilySpec:
    return FamilySpec(
        model_type=model_type,
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        norm_class=f"{prefix}RMSNorm",
        attention_class=f"{prefix}Attention",
        mlp_class="Qwen2MLP",
        causal_lm_class=f"{prefix}ForConditionalGeneration",
        layers_at="model.language_model",
    )


SPECS = (
    _spec("qwen2_vl", "qwen2_vl", "Qwen2VL"),
    _spec("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VL"),
)
