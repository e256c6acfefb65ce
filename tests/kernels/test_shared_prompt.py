"""DPO pairs with each prompt once (sftop/kernels/shared_prompt.py).

CPU: the layout of a hand-made batch, field by field; the attention over the packed row against
each side's own causal attention in float64; the patched model's log-prob head with the layout
against the same head over the padded batch (log-probs, entropy, mean logits, top-1, LoRA
gradients); batches the layout does not describe fall back.  GPU: the flash path against the
CPU mask's semantics in bf16.
"""

from __future__ import annotations

import pytest
import torch
from _kernel_testutil import rel_err
from _tiny_models import DEVICE, VOCAB, tiny_model

from sftop.kernels import shared_prompt as SP

HAS_CUDA = torch.cuda.is_available()
PAD = 0


def _batch(pairs, width=None):
    """TRL's DPO batch of `pairs` (prompt, chosen answer, rejected answer) as token lists: input ids
    [chosen rows; rejected rows], right-padded, with the attention and completion masks."""
    rows = [(p, c) for p, c, _r in pairs] + [(p, r) for p, _c, r in pairs]
    width = width or max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        completion[i, len(p) : n] = 1
    return ids, mask, completion


def test_the_layout_puts_each_prompt_once_with_both_answers_after_it():
    ids, mask, completion = _batch([([11, 12, 13], [21, 22], [31]), ([14, 15], [23], [32, 33, 34])], width=7)
    lay = SP.build_layout(ids, mask, completion)
    assert lay is not None and lay.batch_shape == (4, 7) and lay.rows_tokens == 5 + 4 + 3 + 5
    # pair 0: prompt + chosen, then the rejected answer; pair 1 likewise
    assert lay.ids.tolist() == [[11, 12, 13, 21, 22, 31, 14, 15, 23, 32, 33, 34]]
    assert lay.positions.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4]]
    assert lay.cu_q.tolist() == [0, 5, 6, 9, 12] and lay.cu_k.tolist() == [0, 5, 9, 12, 17]
    # the rejected segments' keys: their prompt, then themselves
    assert lay.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 6, 7, 9, 10, 11]
    assert (lay.max_q, lay.max_k) == (5, 5)
    # scored (row, t) in row-major order: chosen 0 predicts 21, 22 from positions 2, 3; chosen 1
    # predicts 23 from 7; rejected 0 predicts 31 from the prompt's last position 2; rejected 1
    # predicts 32 from 7, then 33, 34 from its own 9, 10
    assert lay.scored_src.tolist() == [2, 3, 7, 2, 7, 9, 10]
    assert lay.scored_labels.tolist() == [21, 22, 23, 31, 32, 33, 34]


def test_batches_the_layout_does_not_describe_run_as_they_came():
    ids, mask, completion = _batch([([11, 12], [21], [31, 32]), ([14, 15], [23], [32])])
    other = ids.clone()
    other[3, 0] = 99  # pair 1's rejected row has another prompt
    assert SP.build_layout(other, mask, completion) is None
    left = mask.flip(1)  # left padding
    assert SP.build_layout(ids, left, completion) is None
    assert SP.build_layout(ids[:3], mask[:3], completion[:3]) is None  # not [chosen; rejected]


def _reference_attention(q, k, v, rows):
    """float64 causal attention of each row's own tokens (rows: lists of packed positions)."""
    out = torch.zeros(q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
    for row in rows:
        idx = torch.tensor(row)
        qs, ks, vs = (t[0][:, idx].double() for t in (q, k, v))
        s = qs @ ks.transpose(-1, -2) / q.shape[-1] ** 0.5
        s = s.masked_fill(torch.ones(len(row), len(row), dtype=torch.bool).triu(1), float("-inf"))
        out[idx] = (s.softmax(-1) @ vs).transpose(0, 1)
    return out


def test_packed_attention_equals_each_side_on_its_own():
    ids, mask, completion = _batch([([1, 2, 3, 4], [5, 6, 7], [8, 9]), ([1, 2], [3], [4, 5, 6, 7, 8])])
    lay = SP.build_layout(ids, mask, completion)
    g = torch.Generator().manual_seed(0)
    heads, dim, n = 4, 8, lay.tokens
    q = torch.randn(1, heads, n, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, n, dim, generator=g, dtype=torch.float64) for _ in range(2))  # grouped K/V
    out = SP.shared_prompt_attention(q, k, v, lay)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    # each side as its own row: pair 0 chosen = 0..6, rejected = prompt 0..3 + 7..8; pair 1 likewise
    chosen = [list(range(0, 7)), list(range(9, 12))]
    rejected = [[0, 1, 2, 3, 7, 8], [9, 10, 12, 13, 14, 15, 16]]
    ref_c = _reference_attention(q, kk, vv, chosen)
    ref_r = _reference_attention(q, kk, vv, rejected)
    for rows, ref in ((chosen, ref_c), (rejected, ref_r)):
        for row in rows:
            assert rel_err(out[0, row], ref[row]) < 1e-12


def _patched_llama():
    import sftop.kernels as K
    from sftop.kernels import compat
    from sftop.kernels.patching.logprob_head import install_logprob_head
    from sftop.kernels.varlen_attention import NAME, register

    model = tiny_model("llama", init_lora_weights=False)
    K.patch_model(model)
    register()  # sftop's packed attention, as the attention part sets it on a GPU
    compat.set_config_attn_implementation(model.get_base_model().config, NAME)
    assert install_logprob_head(model.get_base_model()) == "fused"
    return model


def _scored(model, ids, mask, labels, layout=None):
    lm = model.get_base_model()
    model.zero_grad(set_to_none=True)
    with SP.shared_prompt_scope(lm, layout):
        out = lm(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    weights = torch.linspace(0.5, 1.5, out.log_probs.shape[-1], device=out.log_probs.device)
    (out.log_probs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_the_log_prob_head_with_each_prompt_once_equals_the_padded_batch(monkeypatch):
    g = torch.Generator().manual_seed(1)

    def words(k):
        return torch.randint(4, VOCAB, (k,), generator=g).tolist()

    ids, mask, completion = _batch([(words(9), words(4), words(6)), (words(5), words(7), words(2))])
    lay = SP.build_layout(ids, mask, completion)
    assert lay is not None and lay.tokens == 9 + 4 + 6 + 5 + 7 + 2 < int(mask.sum())
    labels = ids.masked_fill(completion == 0, -100)
    model = _patched_llama()
    ids, mask, labels = ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)
    calls = []
    real = SP.shared_prompt_logprobs
    monkeypatch.setattr(SP, "shared_prompt_logprobs", lambda *a: (calls.append(1), real(*a))[1])
    padded, grads_p = _scored(model, ids, mask, labels)
    shared, grads_s = _scored(model, ids, mask, labels, lay.to(DEVICE))
    assert calls == [1]  # the second call took the shared path, the first did not
    for field in ("log_probs", "entropy", "mean_logits"):
        assert rel_err(getattr(shared, field), getattr(padded, field)) < 1e-5, field
    assert torch.equal(shared.is_top1, padded.is_top1) and torch.equal(shared.label_mask, padded.label_mask)
    assert grads_s.keys() == grads_p.keys() and any("lora_" in n for n in grads_p)
    for n in grads_p:
        assert rel_err(grads_s[n], grads_p[n]) < 1e-4, n
    # a call that is not the layout's batch (another shape) runs as it came
    calls.clear()
    _scored(model, ids[:, :-1], mask[:, :-1], labels[:, :-1], lay.to(DEVICE))
    assert calls == []


def test_pairs_of_one_shape_replay_from_the_log_prob_graphs(monkeypatch):
    """DPO's order, reference (adapters off, no gradient) then policy, with the model's log-prob
    graphs allowed: the layout's tensors are the captured step's inputs, so batches of other tokens
    but the same shapes replay it, with the eager path's outputs and gradients."""
    from _rerun_steps import rerun_captures

    from sftop.kernels.cuda_graphs import StepGraphs
    from sftop.kernels.logprob_graphs import graph_stats
    from sftop.kernels.patching import markers as M

    made = rerun_captures(monkeypatch)
    g = torch.Generator().manual_seed(2)

    def batch():
        # the same shapes every time (what a fixed-length benchmark feeds): other tokens only
        words = torch.randint(4, VOCAB, (2, 16), generator=g).tolist()
        return _batch([(w[:6], w[6:10], w[10:]) for w in words])

    eager, graphed = _patched_llama(), _patched_llama()
    graphed.get_base_model().__dict__[M.GRAPHS] = StepGraphs()  # the cuda_graphs part's "graphs allowed"

    def dpo_step(model, ids, mask, labels, layout):
        lm = model.get_base_model()
        model.zero_grad(set_to_none=True)
        with SP.shared_prompt_scope(lm, layout):
            with torch.no_grad(), model.disable_adapter():
                ref = lm(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
            out = lm(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        weights = torch.linspace(0.5, 1.5, out.log_probs.shape[-1])
        ((out.log_probs - ref) * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return ref, out.log_probs.detach(), out.entropy.detach(), grads

    for step in range(4):
        ids, mask, completion = batch()
        lay = SP.build_layout(ids, mask, completion)
        labels = ids.masked_fill(completion == 0, -100)
        ref_e, pol_e, ent_e, grads_e = dpo_step(eager, ids, mask, labels, lay)
        ref_g, pol_g, ent_g, grads_g = dpo_step(graphed, ids, mask, labels, lay)
        assert rel_err(ref_g, ref_e) < 1e-6 and rel_err(pol_g, pol_e) < 1e-6 and rel_err(ent_g, ent_e) < 1e-6, step
        assert grads_g.keys() == grads_e.keys()
        for n in grads_e:
            assert rel_err(grads_g[n], grads_e[n]) < 1e-5, (step, n)
    stats = graph_stats(graphed.get_base_model())
    # the policy step captured on its second sighting, the reference one sighting later (after a
    # training capture), then both replayed: policy steps 2-4, reference steps 3-4
    assert [backward for _shapes, _n, backward in made] == [True, False], made
    assert stats.failures == [] and stats.replays == 5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_flash_path_equals_the_mask_path():
    """bf16 flash attention over the gathered keys (the query segments shorter than their keys,
    causal at the end) against the SDPA mask path of the same layout, forward and backward."""
    from sftop.kernels.varlen_attention import varlen_available

    assert varlen_available()[0], varlen_available()[1]
    ids, mask, completion = _batch(
        [(list(range(1, 300)), [5] * 40, [6] * 70), (list(range(1, 90)), [7] * 120, [8] * 9)]
    )
    lay = SP.build_layout(ids, mask, completion).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    n = lay.tokens
    q = torch.randn(1, 16, n, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k, v = (
        torch.randn(1, 4, n, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2)
    )
    out = SP.shared_prompt_attention(q, k, v, lay)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = SP.shared_prompt_attention(*ref_in, lay)  # fp32: the mask path
    assert rel_err(out, ref) < 1e-2
    dout = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    out.backward(dout)
    ref.backward(dout.float())
    for t, r in zip((q, k, v), ref_in):
        assert rel_err(t.grad, r.grad) < 2e-2
