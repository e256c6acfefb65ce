"""Padding-free (packed) attention through PyTorch's own variable-length flash attention.

Why: TRL's padding-free batches put a micro-batch's rows into one sequence with restarting
position ids.  Under SDPA, transformers turns that into a [1, 1, T, T] block-diagonal mask, and
SDPA with an explicit mask leaves flash attention for its memory-efficient kernel: every query is
scored against the whole packed row (T^2 work instead of the sum of each row's L^2), K and V are
copied out to every query head, and the mask itself costs T^2 memory.  For short chat rows (8
rows of ~450 tokens per micro-batch) that is about 5x the attention work, and it was the largest
single cost of a whole run.  `torch.nn.attention.varlen.varlen_attn` runs flash attention over
the rows' boundaries (`cu_seq_lens`, which TRL's collator already computes on the CPU) instead.

How it plugs in: an attention function and a mask function registered with transformers under
one name (`NAME`), selected through the model's config.  The mask function leaves out the mask
only where the attention function can do without it (one row, no padding, no cache offset);
every other call (padded batches, generation with a cache, several rows) gets transformers' own
SDPA mask and runs transformers' own SDPA attention, unchanged -- except inside an offloading
checkpoint, where unmasked causal attention keeps its output for the recomputation
(kept_attention.py).
"""

from __future__ import annotations

import functools
import inspect

import torch

NAME = "sftop_varlen"


@functools.lru_cache(maxsize=1)
def _varlen_api():
    """(varlen_attn, its keyword parameters) or (None, reason)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # noqa: BLE001 - older torch, or a build without it
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen ({type(exc).__name__})"
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> tuple[bool, str]:
    """Whether packed attention can run on the current CUDA device."""
    fn, params = _varlen_api()
    if fn is None:
        return False, params
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"flash attention needs compute capability 8.0+, this GPU has {major}.{minor}"
    return True, ""


def native_gqa() -> bool:
    """Whether torch's varlen API takes fewer K/V heads than query heads (else they are repeated)."""
    return "enable_gqa" in (_varlen_api()[1] or ())


def packed_attention_config(config):
    """The config of the layers packed attention would run in: a vision-language model that a kernel
    family file describes (patching/registry.MULTIMODAL: Qwen2-VL, Qwen2.5-VL) gets it in its
    language model, whose layers read packed sample boundaries from the text row of its position
    ids; any other config is returned as it is (`config_supported` refuses other VLMs)."""
    from .patching.registry import MULTIMODAL

    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    spec = MULTIMODAL.get(get("model_type"))
    # a family file may refuse it (Gemma 3: image tokens attend both ways)
    return text if text is not None and spec is not None and spec.packed_attention else config


def config_supported(config, dtype: str) -> tuple[bool, str]:
    """Whether a model with this (text) config can take the packed path: causal full attention in
    every layer, no logit softcapping, no attention dropout, bf16/fp16 compute."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None:
        return False, "vision-language models keep SDPA"
    if dtype not in ("bf16", "fp16"):
        return False, f"{dtype} weights (flash attention needs bf16 or fp16)"
    if any(t != "full_attention" for t in (get("layer_types") or ())):
        return False, "sliding-window attention layers"
    if get("sliding_window") and get("use_sliding_window", True) and not get("layer_types"):
        return False, "sliding-window attention"
    if get("attn_logit_softcapping"):
        return False, "attention logit softcapping"
    if get("attention_dropout", 0.0):
        return False, "attention dropout > 0"
    return True, ""


def _cu_seq_lens(kwargs: dict, n_tokens: int, device) -> tuple[torch.Tensor, int]:
    """Row boundaries of a packed sequence: TRL's collator passes them; else from position ids."""
    cu = kwargs.get("cu_seq_lens_q")
    # TRL passes the same boundaries for queries and keys (no cache): trusted as given, since
    # checking them against n_tokens would cost a host sync in every layer
    if cu is not None and kwargs.get("cu_seq_lens_k") is not None:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int(cu.diff().max())
        return cu.to(device=device, dtype=torch.int32), int(max_len)
    pos = kwargs.get("position_ids")
    if pos is not None and pos.shape[-1] == n_tokens:
        # Every layer of one forward (and its recomputation) gets the same position ids tensor:
        # its boundaries are found once, with one host sync, not once per layer.
        last = _LAST_BOUNDARIES[0]
        if last is not None and last[0] is pos and last[1] == pos._version and last[2] == device:
            return last[3], last[4]
        starts = (pos.reshape(-1) == 0).nonzero().flatten()
        if starts.numel() == 0 or int(starts[0]) != 0:
            starts = torch.cat([starts.new_zeros(1), starts])
        cu = torch.cat([starts, starts.new_full((1,), n_tokens)]).to(device=device, dtype=torch.int32)
        max_len = int(cu.diff().max())
        # holding `pos` keeps its identity unique while it is remembered
        _LAST_BOUNDARIES[0] = (pos, pos._version, device, cu, max_len)
        return cu, max_len
    return torch.tensor([0, n_tokens], device=device, dtype=torch.int32), n_tokens


# (position ids, their version, device, boundaries, longest row) of the last packed row seen
_LAST_BOUNDARIES: list = [None]


def block_causal_mask(cu: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[1, 1, T, T] boolean mask: causal within each row that `cu` delimits, nothing across rows."""
    device = cu.device
    row = torch.zeros(n_tokens, dtype=torch.int64, device=device)
    inner = cu[1:-1].long()
    row[inner[inner < n_tokens]] = 1
    row = row.cumsum(0)
    idx = torch.arange(n_tokens, device=device)
    return ((row[:, None] == row[None, :]) & (idx[:, None] >= idx[None, :]))[None, None]


def _tokens_heads_dim(t: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] -> [T, H, D].  HF's projections (and sftop's RoPE) leave Q, K and V in [B, T, H, D]
    memory order, so this is normally a free view."""
    t = t[0].transpose(0, 1)
    return t if t.stride(-1) == 1 and t.is_contiguous() else t.contiguous()


def packed_attention(
    query, key, value, cu: torch.Tensor, max_len: int, scale: float | None, causal: bool = True
) -> torch.Tensor:
    """Attention within each row of a packed sequence, causal or (`causal=False`, a vision tower's
    windows and images) both ways.  query [1, Hq, T, D], key/value [1, Hkv, T, D]; returns
    [1, T, Hq, D] (HF's attention output layout)."""
    fn, params = _varlen_api()
    q, k, v = (_tokens_heads_dim(t) for t in (query, key, value))
    kw: dict[str, object] = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older API: one KV head per query head
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    if "is_causal" in params:
        kw["is_causal"] = causal
    elif causal:  # newer API: causality is the window (-1, 0); its default (-1, -1) sees both ways
        kw["window_size"] = (-1, 0)
    if scale is not None and "scale" in params:
        kw["scale"] = scale
    out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.unsqueeze(0)


def _capturing_unpacked(kwargs) -> bool:
    """Inside a CUDA-graph capture without row boundaries: finding them from position ids needs a
    host sync, and the graph path (cuda_graphs.py) only captures unpacked rows, which SDPA's causal
    attention computes alike."""
    if kwargs.get("cu_seq_lens_q") is not None or not torch.cuda.is_available():
        return False  # (a CPU-only torch has no capture query at all)
    return torch.cuda.is_current_stream_capturing()


def _varlen_ok(module, query, key, attention_mask, dropout, scaling) -> bool:
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return False
    if not getattr(module, "is_causal", True):
        return False
    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16) or dropout:
        return False
    if scaling is not None and "scale" not in _varlen_api()[1]:
        return abs(scaling - query.shape[-1] ** -0.5) < 1e-12
    return True


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: (module, q, k, v, mask, ...) -> (output [B, T, H, D], None)."""
    from .kept_attention import applies as kept_applies, kept_attention
    from .shared_prompt import KWARG as SHARED_PROMPT

    shared = kwargs.get(SHARED_PROMPT)
    if shared is not None:
        # DPO pairs with each prompt once (shared_prompt.py); decided by the call's own arguments, so
        # a checkpoint's recomputation takes this path as its first run did (never the kept one)
        from .shared_prompt import shared_prompt_attention

        return shared_prompt_attention(query, key, value, shared, scaling, dropout), None
    unpacked_capture = _capturing_unpacked(kwargs)
    kept = kept_applies(module, query, key, attention_mask, dropout, kwargs)
    if (
        kwargs.get("is_causal", True) is not False
        and not unpacked_capture
        and _varlen_ok(module, query, key, attention_mask, dropout, scaling)
    ):
        cu, max_len = _cu_seq_lens(kwargs, query.shape[2], query.device)
        if not (kept and cu.numel() == 2):
            return packed_attention(query, key, value, cu, max_len, scaling), None
        # else one row after all: plain causal attention, whose checkpoint keeps its output (as
        # a captured step of the same batch does, which has no row boundaries to look at)
    if kept:
        return kept_attention(query, key, value, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        attention_mask is None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and not unpacked_capture
        and (kwargs.get("cu_seq_lens_q") is not None or kwargs.get("position_ids") is not None)
    ):
        # Our mask function left this row unmasked for the packed path, which cannot run here
        # (CPU, fp32, dropout): rebuild the block-diagonal causal mask SDPA would have had.
        cu, _ = _cu_seq_lens(kwargs, query.shape[2], query.device)
        attention_mask = block_causal_mask(cu, query.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """transformers mask interface: no mask where `attention_forward` takes the packed path (one
    unpadded row without a cache offset), else exactly the mask SDPA would get."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    no_offset = isinstance(q_offset, int) and q_offset == 0 and isinstance(kv_offset, int) and kv_offset == 0
    if attention_mask is None and batch_size == 1 and q_length == kv_length and no_offset:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register() -> None:
    """Make `NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
    _skip_packed_search()


# Set on a packed row's position ids (`rows_given`): its boundaries come as `cu_seq_lens`.
ROWS_GIVEN = "_sftop_rows_given"


def rows_given(position_ids: torch.Tensor) -> None:
    """Say that this packed row's boundaries come as `cu_seq_lens`, which packed attention reads
    itself: transformers then need not find them in the position ids.  Its search
    (`masking_utils.find_packed_sequence_indices`) reads a device value back to the host, a stall
    of every eager packed micro-batch, and its answer only shapes an SDPA mask that this module's
    mask function leaves out for such a row anyway.  Only for models running `NAME`."""
    setattr(position_ids, ROWS_GIVEN, True)


def _skip_packed_search() -> None:
    import transformers.masking_utils as masking

    search = masking.find_packed_sequence_indices
    if getattr(search, ROWS_GIVEN, False):
        return

    @functools.wraps(search)
    def find_packed_sequence_indices(position_ids):
        if getattr(position_ids, ROWS_GIVEN, False):
            return None
        return search(position_ids)

    setattr(find_packed_sequence_indices, ROWS_GIVEN, True)
    masking.find_packed_sequence_indices = find_packed_sequence_indices
