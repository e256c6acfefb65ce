"""DPO pairs whose prompt runs once: `[prompt + chosen | rejected answer]` in one packed row, the
rejected answer attending to its pair's prompt and itself.

Why: a DPO micro-batch runs every pair's prompt twice, once in front of each answer, in the
policy's forward, backward and recomputation and in the reference forward.  With the step
benchmark's pairs (a 768-token prompt, two 256-token answers) the prompt is 75 % of each side; run
once, a pair is 1,280 tokens instead of 2,048, and on an 8B model, where the step is bound by the
GPU's matmuls, that work is what sets the pace.

How:
  * `build_layout` (host tensors, where the collator made the batch: no device read) checks that
    each pair's two rows share their prompt token for token, then lays the pairs out in one row:
    for each pair the prompt with the chosen answer (positions 0..), then the rejected answer
    (positions continuing after the prompt, as in its own row);
  * attention (`shared_prompt_attention`): every segment attends causally to its keys, the prompt
    and chosen segment to itself, the rejected segment to its pair's prompt followed by itself.
    The keys and values are gathered into that order (`kv_index`) and PyTorch's variable-length
    flash attention runs once over all segments, the query segments shorter than their key
    segments with the causal mask aligned at the end, as for decoding after a cache; elsewhere
    (the CPU, fp32) one SDPA call with the equivalent mask over the packed row;
  * scoring: the rejected answer's first token is predicted by the prompt's last position, which
    the chosen side's first prediction shares; `scored_src` names, for each scored position of the
    padded [2B, T-1] layout the trainer expects, the packed position whose hidden state scores it,
    so log-probabilities, entropy, mean logits and top-1 come back in that layout unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the keyword the layout travels under through the decoder layers to the attention function
KWARG = "sftop_shared_prompt"


@dataclass
class SharedPromptLayout:
    """One micro-batch of B pairs ([chosen rows; rejected rows], T tokens) laid out with each prompt once."""

    ids: torch.Tensor  # [1, N] token ids of the packed row
    positions: torch.Tensor  # [1, N] their positions
    cu_q: torch.Tensor  # [S + 1] int32: query segment boundaries in the packed row
    cu_k: torch.Tensor  # [S + 1] int32: key segment boundaries in the gathered keys
    kv_index: torch.Tensor  # [N_k] long: packed positions of the gathered keys, segment by segment
    max_q: int
    max_k: int
    scored_src: torch.Tensor  # [M] long: the packed position scoring each counted (row, t), row-major
    scored_labels: torch.Tensor  # [M] long: the token each of them predicts
    batch_shape: tuple[int, int]  # (2B, T) of the padded batch it replaces
    rows_tokens: int  # tokens of the padded batch's rows without padding (both sides, prompts twice)

    def to(self, device, non_blocking: bool = False) -> "SharedPromptLayout":
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("ids", "positions", "cu_q", "cu_k", "kv_index", "scored_src", "scored_labels")
        }
        return SharedPromptLayout(
            **moved,
            max_q=self.max_q,
            max_k=self.max_k,
            batch_shape=self.batch_shape,
            rows_tokens=self.rows_tokens,
        )

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[1])


def _right_padded(mask_row: torch.Tensor) -> int | None:
    """The row's length when its mask is ones then zeros, else None."""
    n = int(mask_row.sum())
    if not bool((mask_row[:n] == 1).all()) or not bool((mask_row[n:] == 0).all()):
        return None
    return n


def build_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> SharedPromptLayout | None:
    """The shared-prompt layout of a DPO batch [chosen rows; rejected rows] in host memory, or None
    when a pair's rows do not share their prompt (or the rows are not right-padded, or an answer
    is empty): such a batch runs as it came."""
    tensors = (input_ids, attention_mask, completion_mask)
    if any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dim() != 2 for t in tensors):
        return None
    rows, width = input_ids.shape
    if rows % 2 or rows == 0 or attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        return None
    pairs = rows // 2
    ids_parts, pos_parts, kv_parts = [], [], []
    q_lengths, k_lengths = [], []
    labels = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]
    scored = labels != -100
    src = torch.full((rows, width - 1), -1, dtype=torch.long)
    offset = 0
    for i in range(pairs):
        chosen, rejected = i, pairs + i
        n_c, n_r = _right_padded(attention_mask[chosen]), _right_padded(attention_mask[rejected])
        if n_c is None or n_r is None:
            return None
        answer_c = completion_mask[chosen, :n_c].nonzero()
        answer_r = completion_mask[rejected, :n_r].nonzero()
        if answer_c.numel() == 0 or answer_r.numel() == 0:
            return None
        prompt = int(answer_c[0])
        # the prompt is the first answer token's prefix in both rows, token for token, and each
        # answer runs to the row's end (what TRL's collator builds)
        if int(answer_r[0]) != prompt or prompt < 1:
            return None
        if not bool(completion_mask[chosen, prompt:n_c].all()) or not bool(completion_mask[rejected, prompt:n_r].all()):
            return None
        if not torch.equal(input_ids[chosen, :prompt], input_ids[rejected, :prompt]):
            return None
        if bool(scored[chosen, n_c - 1 :].any()) or bool(scored[rejected, n_r - 1 :].any()):
            return None  # a label under padding: not a batch this layout describes
        start_a, start_b = offset, offset + n_c
        answer_len = n_r - prompt
        ids_parts += [input_ids[chosen, :n_c], input_ids[rejected, prompt:n_r]]
        pos_parts += [torch.arange(n_c), torch.arange(prompt, n_r)]
        kv_parts += [
            torch.arange(start_a, start_a + n_c),
            torch.arange(start_a, start_a + prompt),
            torch.arange(start_b, start_b + answer_len),
        ]
        q_lengths += [n_c, answer_len]
        k_lengths += [n_c, prompt + answer_len]
        # position t of a row scores token t + 1: the chosen row's from its own segment; the
        # rejected row's first answer token from the prompt's last position, the rest from its own
        src[chosen, : n_c - 1] = torch.arange(start_a, start_a + n_c - 1)
        src[rejected, prompt - 1] = start_a + prompt - 1
        src[rejected, prompt : n_r - 1] = torch.arange(start_b, start_b + answer_len - 1)
        offset = start_b + answer_len
    scored_src = src[scored]
    if bool((scored_src < 0).any()):
        return None
    return SharedPromptLayout(
        ids=torch.cat(ids_parts)[None],
        positions=torch.cat(pos_parts)[None],
        cu_q=_cumulative(q_lengths),
        cu_k=_cumulative(k_lengths),
        kv_index=torch.cat(kv_parts),
        max_q=max(q_lengths),
        max_k=max(k_lengths),
        scored_src=scored_src,
        scored_labels=labels[scored],
        batch_shape=(rows, width),
        rows_tokens=int(attention_mask.sum()),
    )


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def allowed_keys(layout: SharedPromptLayout) -> torch.Tensor:
    """[N, N] boolean: which packed positions each packed position attends to (the fallback's mask)."""
    n = layout.tokens
    device = layout.kv_index.device
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    cu_q, cu_k = layout.cu_q.tolist(), layout.cu_k.tolist()
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        lq, lk = q1 - q0, k1 - k0
        # query i sees key j when j <= i + (lk - lq): the causal mask aligned at the segments' ends
        causal = torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None] + (lk - lq)
        rows = torch.arange(q0, q1, device=device)[:, None].expand(lq, lk)
        cols = layout.kv_index[k0:k1][None, :].expand(lq, lk)
        allowed[rows[causal], cols[causal]] = True
    return allowed


def _flash_ok(query, dropout, scaling) -> bool:
    from .varlen_attention import _varlen_api, varlen_available

    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout):
        return False
    if not varlen_available()[0]:
        return False
    if scaling is not None and "scale" not in _varlen_api()[1]:
        return abs(scaling - query.shape[-1] ** -0.5) < 1e-12  # an older API scales by 1/sqrt(D) only
    return True


def shared_prompt_attention(query, key, value, layout: SharedPromptLayout, scaling=None, dropout: float = 0.0):
    """transformers' attention output [1, N, H, D] from q [1, Hq, N, D] and k/v [1, Hkv, N, D] of the
    packed row, each segment attending as the layout says."""
    if _flash_ok(query, dropout, scaling):
        from .varlen_attention import _tokens_heads_dim, _varlen_api

        fn, params = _varlen_api()
        q, k, v = (_tokens_heads_dim(t) for t in (query, key, value))
        k, v = k.index_select(0, layout.kv_index), v.index_select(0, layout.kv_index)
        kw: dict[str, object] = {}
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)
        if scaling is not None and "scale" in params:
            kw["scale"] = scaling
        out = fn(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, **kw)
        return out.unsqueeze(0)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = allowed_keys(layout)[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous()


def shared_prompt_scope(lm, layout: SharedPromptLayout | None):
    """While active, the log-prob head of `lm` (patching/logprob_head.py) runs a batch of the
    layout's shape with each prompt once; the reference and policy forwards of one micro-batch."""
    import contextlib

    from .patching import markers as M

    @contextlib.contextmanager
    def scope():
        if layout is None:
            yield
            return
        lm.__dict__[M.SHARED_PROMPT] = layout
        try:
            yield
        finally:
            lm.__dict__.pop(M.SHARED_PROMPT, None)

    return scope()


# what a log-prob call may carry for the shared path to stand in for it: the padded batch alone
_PLAIN_KEYS = frozenset({"input_ids", "attention_mask", "use_cache"})


def layout_for_call(lm, kwargs: dict, shift_labels) -> SharedPromptLayout | None:
    """The active layout when this log-prob call is the batch it was made from, else None."""
    from .patching import markers as M
    from .varlen_attention import NAME

    layout = lm.__dict__.get(M.SHARED_PROMPT)
    if layout is None or shift_labels is not None:
        return None
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != layout.batch_shape:
        return None
    if any(k not in _PLAIN_KEYS and v is not None for k, v in kwargs.items()):
        return None
    from . import compat

    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if compat.attn_implementation(config) != NAME:
        return None  # the attention that reads the layout is sftop's packed one
    return layout


def shared_prompt_logprobs(lm, layout: SharedPromptLayout, labels: torch.Tensor, softcap):
    """(log_probs, entropy, mean_logits, is_top1, mask) in the padded batch's [2B, T-1] layout, as the
    log-prob head's eager path returns them, from one forward of the packed row: replayed from the
    model's log-prob CUDA graphs once the layout's shape repeats (a fixed-shape batch, as in a
    benchmark), else eagerly."""
    scored = _graphed(lm, layout, softcap)
    if scored is None:
        scored = _scored(lm, layout, softcap)
    from .patching.logprob_head import padded_rows

    return padded_rows(scored, labels[:, 1:].to(scored[0].device) != -100)


def _scored(lm, layout: SharedPromptLayout, softcap, chunk_bytes: int | None = None):
    """(log_prob, entropy, mean_logit, is_top1) of each scored position, [M] each: the backbone over
    the packed row, then the fused kernel over the positions that predict an answer token."""
    from .fused_linear_logprob import fused_linear_logprob
    from .patching import markers as M
    from .varlen_attention import rows_given

    rows_given(layout.positions)  # its boundaries are the layout's: transformers need not search them
    out = lm.base_model(input_ids=layout.ids, position_ids=layout.positions, use_cache=False, **{KWARG: layout})
    hidden = out.last_hidden_state[0]
    head = lm.get_output_embeddings()
    return fused_linear_logprob(
        hidden.index_select(0, layout.scored_src).to(head.weight.device),
        head.weight,
        layout.scored_labels.to(head.weight.device),
        softcap=softcap,
        compute_dtype=lm.__dict__.get(M.LOSS_DTYPE),
        chunk_bytes=chunk_bytes,
        stats=True,
    )


def _graphed(lm, layout: SharedPromptLayout, softcap):
    """`_scored` from the model's log-prob graphs (logprob_graphs.py), or None for the eager path.

    The key holds every shape and host integer the captured work bakes in (the packed row's and
    the gathered keys' lengths, the segment count, the scored positions, the longest segments);
    the layout's tensors are the graph's inputs, so pairs of the same shapes replay whatever their
    tokens and prompt lengths."""
    from .cuda_graphs import capturable
    from .logprob_graphs import CHUNK_BYTES, keyed_trainable, logprob_graphs_of

    if not capturable(layout.ids):
        return None
    graphs = logprob_graphs_of(lm)
    if graphs is None:
        return None
    grad = torch.is_grad_enabled()
    head = (
        "shared_prompt",
        grad,
        layout.tokens,
        int(layout.kv_index.shape[0]),
        int(layout.cu_q.shape[0]),
        int(layout.scored_src.shape[0]),
        layout.max_q,
        layout.max_k,
    )
    keyed = keyed_trainable(lm, graphs, head)
    if keyed is None:
        return None
    key, trainable = keyed
    max_q, max_k, batch_shape, rows_tokens = layout.max_q, layout.max_k, layout.batch_shape, layout.rows_tokens
    chunk = CHUNK_BYTES

    def step(ids, positions, cu_q, cu_k, kv_index, src, labels):
        static = SharedPromptLayout(
            ids, positions, cu_q, cu_k, kv_index, max_q, max_k, src, labels, batch_shape, rows_tokens
        )
        return _scored(lm, static, softcap, chunk_bytes=chunk)

    inputs = (
        layout.ids,
        layout.positions,
        layout.cu_q,
        layout.cu_k,
        layout.kv_index,
        layout.scored_src,
        layout.scored_labels,
    )
    return graphs.steps.replay(key, step, inputs, trainable, backward=grad)
