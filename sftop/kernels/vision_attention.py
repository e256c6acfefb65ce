"""A Qwen-VL vision tower's windowed and per-image attention as one launch per layer.

Why: the Qwen2-VL, Qwen2.5-VL and Qwen3-VL towers hold every image of a batch in one sequence of
patches, split into attention segments by cumulative lengths (`cu_seqlens`): whole images in the
full-attention blocks, 8x8-patch windows in Qwen2.5-VL's windowed blocks.  Unless the model's
attention is a flash implementation, transformers runs those segments one SDPA call at a time,
after reading the lengths back to the host in every layer.  At 4 rows with one 448x448 image each
that is 64 windows a layer, about 3,700 attention launches a step with checkpointing, and the
tower took twice the language model's time while the GPU idled 60 % of the step.

How: an attention function registered with transformers under `NAME`, set on the tower's (vision)
config only.  The name contains "flash", which is what those towers test to hand the attention
the segment boundaries and their maximum length (computed once per tower call, not per layer)
instead of looping.  On a CUDA GPU with bf16/fp16 activations it runs PyTorch's variable-length
flash attention over all segments at once, non-causal (varlen_attention.packed_attention); where
that cannot run (CPU, fp32, dropout) one SDPA call with a block-diagonal mask does, or for a very
long sequence one call per segment, so no [T, T] mask is ever larger than `MASK_LIMIT` tokens.
"""

from __future__ import annotations

import torch

NAME = "sftop_flash_varlen_vision"
# above this many patches the fallback loops over segments instead of building a [T, T] mask
MASK_LIMIT = 8192


def segment_mask(cu: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[1, 1, T, T] boolean mask: every position sees exactly the positions of its own segment."""
    seg = torch.zeros(n_tokens, dtype=torch.int64, device=cu.device)
    inner = cu[1:-1].long()
    seg[inner[inner < n_tokens]] = 1
    seg = seg.cumsum(0)
    return (seg[:, None] == seg[None, :])[None, None]


def _flash_ok(query, dropout) -> bool:
    from .varlen_attention import varlen_available

    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout and varlen_available()[0]


def _sdpa(query, key, value, mask, scale, dropout):
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale
    )


def segment_attention(
    query, key, value, cu: torch.Tensor, max_len: int | None, scale: float | None, dropout: float = 0.0
) -> torch.Tensor:
    """Non-causal attention within each segment `cu` delimits.  query/key/value [1, H, T, D] (the
    tower's heads are never grouped); returns [1, T, H, D]."""
    n = query.shape[2]
    if _flash_ok(query, dropout):
        from .varlen_attention import packed_attention

        if max_len is None:
            max_len = int(cu.diff().max())  # one host sync; the towers pass it precomputed
        return packed_attention(query, key, value, cu.to(torch.int32), int(max_len), scale, causal=False)
    if n <= MASK_LIMIT:
        out = _sdpa(query, key, value, segment_mask(cu, n), scale, dropout)
    else:
        bounds = cu.tolist()
        out = torch.cat(
            [
                _sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, scale, dropout)
                for a, b in zip(bounds[:-1], bounds[1:])
                if b > a
            ],
            dim=2,
        )
    return out.transpose(1, 2)


def attention_forward(
    module,
    query,
    key,
    value,
    attention_mask=None,
    dropout: float = 0.0,
    scaling=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    **kwargs,
):
    """transformers attention interface: (module, q, k, v, mask, ...) -> (output [B, T, H, D], None)."""
    same = cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q
    if (
        cu_seq_lens_q is not None
        and same
        and attention_mask is None
        and query.shape[0] == 1
        and query.shape[1] == key.shape[1]
    ):
        return segment_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling, dropout), None
    # anything else (a batch of separate sequences, a mask) is plain bidirectional SDPA, as stock
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )


def register() -> None:
    """Make `NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
