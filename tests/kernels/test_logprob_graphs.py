"""DPO's log-prob forwards from CUDA graphs (sftop/kernels/logprob_graphs.py).

CPU tests: the graphs' all-positions form of the fused log-prob kernel against float64 (forward and
backward, odd sizes, prompt and padding positions that must score zero and pass no gradient); a
right-padded batch run as unpadded and padded up to its length bucket gives the masked eager head's
log-probs, metrics and LoRA gradients; the batch check, the length buckets and the adapter state in
the key; the graphs' switch and report; and the deferred NaN/inf guard of the DPO trainer.

GPU tests: a graphed DPO step (policy forward+backward and reference forward) gives the eager step's
loss, rewards and LoRA gradients over several optimizer steps with batches of changing lengths (and
with gradient accumulation), replays both graphs, and its reference graph runs with the adapter off
(the base model's log-probs); its steady-state memory (allocated peak plus the graphs' pool) stays
within a stated margin of the eager step's peak.
"""

import gc

import pytest
import torch

import sftop.kernels as K
from sftop.kernels import cuda_graphs as cg
from sftop.kernels import logprob_graphs as lg
from sftop.kernels.fused_linear_logprob import fused_linear_logprob
from sftop.kernels.patching.logprob_head import install_logprob_head

from _kernel_testutil import DEVICE, rel_err
from _tiny_models import LORA_TARGETS, VOCAB, tiny_model, twin

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _right_padded_batch(lengths, prompts, length=None, seed=0):
    """ids, attention mask and TRL's labels (-100 on prompt and padding) of right-padded rows."""
    g = torch.Generator().manual_seed(seed)
    width = length or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        ids[r, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        mask[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
    return ids, mask, labels


# ----------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_all_position_kernel_matches_float64(poison, dtype, tol):
    """The graphs' form: [B, T] hidden states and shifted labels straight into the kernel, no gather."""
    b, t, hid, vocab = 3, 11, 24, VOCAB + 6  # odd, above every id
    h = torch.randn(b, t, hid, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(vocab, hid, dtype=torch.float64) / hid**0.5 * 3).to(DEVICE, dtype)
    _ids, _mask, labels = _right_padded_batch([12, 9, 7], [4, 2, 5], length=12, seed=3)
    ids_p, shifted = lg.graph_inputs(_ids, labels, 12)
    assert ids_p.shape == shifted.shape == (3, 12)
    y = shifted[:, :t]  # the kernel sees T rows per sequence; the last label (-100) scores nothing
    assert (y == -100).any() and (y != -100).any()
    logp, ent, mean, top1 = fused_linear_logprob(h, w, y.to(DEVICE), stats=True)
    assert logp.shape == ent.shape == mean.shape == top1.shape == (b, t)
    g = torch.randn(b, t, dtype=torch.float64)  # nonzero upstream gradient on ignored positions too
    (dh,) = torch.autograd.grad((logp * g.to(DEVICE, torch.float32)).sum(), h)

    hr = h.detach().double().cpu().requires_grad_()
    logits = hr @ w.detach().double().cpu().t()
    all_logp = torch.log_softmax(logits, -1)
    counted = y != -100
    rlogp = all_logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * counted
    rent = -(all_logp.exp() * all_logp).sum(-1) * counted
    rmean = logits.mean(-1) * counted
    (rdh,) = torch.autograd.grad((rlogp * g).sum(), hr)
    assert rel_err(logp, rlogp) < tol
    assert rel_err(ent, rent) < tol
    assert rel_err(mean, rmean) < max(tol, 1e-5)
    assert rel_err(dh, rdh) < 2 * tol
    ignored = ~counted.to(DEVICE)
    assert torch.count_nonzero(logp[ignored]) == 0 and torch.count_nonzero(dh[ignored]) == 0
    assert torch.count_nonzero(ent[ignored]) == 0 and not top1[ignored].any()


def _eager_and_all_positions(model, ids, mask, labels, length, start):
    """The installed head's eager answer (masked attention, gathered rows) and the graphs' function
    on the same batch run as unpadded and padded to `length`; each with its LoRA gradients under
    one random upstream gradient per token."""
    base = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn(ids.shape[0], ids.shape[1] - 1)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    eager = (out.log_probs, out.entropy, out.mean_logits, out.is_top1)
    eager_grads = torch.autograd.grad((out.log_probs * g).sum(), params)
    graphed = lg.all_position_logprobs(base, *lg.graph_inputs(ids, labels, length), start)
    assert all(o.shape == (ids.shape[0], length) for o in graphed)
    graphed = tuple(o[:, : ids.shape[1] - 1] for o in graphed)
    graphed_grads = torch.autograd.grad((graphed[0] * g).sum(), params)
    return eager, eager_grads, graphed, graphed_grads


@pytest.mark.parametrize("prompts", [[5, 3, 4, 2], [10, 9, 11, 10]])
def test_right_padded_batch_run_as_unpadded_equals_the_masked_eager_head(prompts):
    model = tiny_model("llama")
    K.patch_model(model)
    assert install_logprob_head(model.get_base_model()) == "fused"
    model.train()
    ids, mask, labels = _right_padded_batch([13, 11, 13, 12], prompts)
    ok, first = lg.batch_check(labels, mask).tolist()
    assert ok == 1 and first == min(prompts) - 1
    length = lg.padded_length(13, multiple=16)
    start = lg.scored_start(first, length)
    assert start == (0 if prompts[0] == 5 else 8)  # the second batch skips the LM head on 8 positions
    eager, eager_grads, graphed, graphed_grads = _eager_and_all_positions(model, ids, mask, labels, length, start)
    counted = labels[:, 1:] != -100
    assert eager[0][counted].abs().min() > 0  # real scores, not zeros
    for name, a, b in zip(("log_probs", "entropy", "mean_logits"), eager, graphed):
        assert a.shape == b.shape == counted.shape
        assert rel_err(b, a) < 1e-5, name
    assert torch.equal(eager[3], graphed[3])
    assert len(eager_grads) == 2 * 7 * 2
    for a, b in zip(eager_grads, graphed_grads):
        assert a.abs().sum() > 0
        assert rel_err(b, a) < 1e-4


def test_left_padding_is_refused_and_the_check_reads_once_per_batch(monkeypatch):
    ids, mask, labels = _right_padded_batch([6, 4], [2, 3])
    assert lg.batch_check(labels, mask).tolist() == [1, 1]
    assert lg.batch_check(labels, None).tolist() == [1, 1]
    left = torch.flip(mask, dims=[1])  # the vision collator's left-padded prompts
    assert lg.batch_check(torch.flip(labels, dims=[1]), left).tolist()[0] == 0
    hidden = labels.clone()
    hidden[1, 5] = 7  # a label that counts under padding: eager would score it, the graph could not
    assert lg.batch_check(hidden, mask).tolist()[0] == 0
    assert lg.batch_check(labels, mask * 2).tolist()[0] == 0
    assert lg.batch_check(torch.full_like(labels, -100), mask).tolist() == [1, 0]  # nothing scored

    graphs = lg.LogprobGraphs(tiny_model("llama", lora=False))
    reads = []
    real = lg.batch_check
    monkeypatch.setattr(lg, "batch_check", lambda *a: reads.append(1) or real(*a))
    assert graphs.first_scored(ids, labels, mask) == 1 and graphs.first_scored(ids, labels, mask) == 1
    assert len(reads) == 1  # the reference forward reuses the policy forward's answer
    labels[1, 5] = 7  # changed in place: checked again
    assert graphs.first_scored(ids, labels, mask) is None and len(reads) == 2
    assert graphs.first_scored(ids.clone(), labels.clone(), mask) is None and len(reads) == 3


def test_one_batchs_forwards_read_its_check_once_whatever_labels_tensor_they_get(monkeypatch):
    """Inside labels_from_one_batch the policy forward's labels, built afresh from the same batch,
    reuse the reference forward's answer; outside it, and for other ids, mask or a changed tensor,
    the check is read again."""
    ids, mask, labels = _right_padded_batch([6, 4], [2, 3])
    lm = tiny_model("llama", lora=False)
    graphs = lg.LogprobGraphs(lm)
    reads = []
    real = lg.batch_check
    monkeypatch.setattr(lg, "batch_check", lambda *a: reads.append(1) or real(*a))
    assert graphs.first_scored(ids, labels, mask) == 1
    # labels built again from the same batch: a new tensor
    assert graphs.first_scored(ids, labels.clone(), mask) == 1 and len(reads) == 2
    assert graphs.first_scored(ids, labels.clone(), mask, one_batch=True) == 1 and len(reads) == 2
    assert graphs.first_scored(ids, labels.clone(), mask.clone(), one_batch=True) == 1 and len(reads) == 3
    assert graphs.first_scored(ids.clone(), labels, mask, one_batch=True) == 1 and len(reads) == 4
    graphs.first_scored(ids, labels, mask)
    assert len(reads) == 5
    ids.add_(0)  # changed in place (its version moves): read again
    assert graphs.first_scored(ids, labels.clone(), mask, one_batch=True) == 1 and len(reads) == 6
    # a check worked out on the host is taken instead of a read, for a batch not seen yet
    from sftop.engine.train.dpo_batch_check import HostBatchCheck

    fresh = ids.clone()
    assert graphs.first_scored(fresh, labels, mask, one_batch=True, known=HostBatchCheck(True, 1)) == 1
    assert graphs.first_scored(fresh, labels.clone(), mask, one_batch=True) == 1 and len(reads) == 6
    assert graphs.first_scored(ids.clone(), labels, mask, one_batch=True, known=HostBatchCheck(False, 0)) is None
    assert len(reads) == 6
    # the switch is scoped to the model, nests, and is removed afterwards
    outer = HostBatchCheck(True, 3)
    with lg.labels_from_one_batch(lm, outer):
        with lg.labels_from_one_batch(lm):
            assert lm.__dict__[lg.M.LABELS_FROM_ONE_BATCH].known is None
        assert lm.__dict__[lg.M.LABELS_FROM_ONE_BATCH].known is outer
    assert lg.M.LABELS_FROM_ONE_BATCH not in lm.__dict__


def test_lengths_share_buckets_and_inputs_are_padded_with_ignored_labels():
    assert [lg.padded_length(n) for n in (1, 255, 256, 257, 1024, 1025)] == [256, 256, 256, 512, 1024, 1280]
    # 768 prompt tokens of 1,024: scoring starts at 512; never past the first scored position
    assert [lg.scored_start(f, 1024) for f in (0, 255, 511, 512, 767, 1023)] == [0, 0, 0, 512, 512, 512]
    assert lg.scored_start(0, 1) == 0
    ids, _mask, labels = _right_padded_batch([5, 3], [1, 1])
    ids_p, shifted = lg.graph_inputs(ids, labels, 8)
    assert torch.equal(ids_p[:, :5], ids) and torch.count_nonzero(ids_p[:, 5:]) == 0
    assert torch.equal(shifted[:, :4], labels[:, 1:]) and (shifted[:, 4:] == -100).all()


def test_the_adapter_switched_off_is_part_of_the_key():
    model = tiny_model("llama")
    base = model.get_base_model()
    on = lg.adapter_state(base)
    assert len(on) == 2 * 7 and all(s[1:] == (False, False, ("default",)) for s in on)
    grads_on = [p.requires_grad for p in base.parameters()]
    with model.disable_adapter():  # what TRL's reference forward does
        off = lg.adapter_state(base)
        assert all(s[1] for s in off) and off != on
        # PEFT also freezes the adapter while it is off, which the key sees in the parameters too
        assert [p.requires_grad for p in base.parameters()] != grads_on
    assert lg.adapter_state(base) == on


def test_listed_layout_follows_the_model():
    """Replays read the parameters and adapter layers from a list made once; any other call lists
    them afresh and notices a new adapter."""
    from peft import LoraConfig

    model = tiny_model("llama")
    base = model.get_base_model()
    graphs = lg.LogprobGraphs(base)
    fresh = [(m, n, p) for m in base.modules() for n, p in m._parameters.items() if p is not None]
    assert [s[2] for s in graphs.slots()] == [s[2] for s in fresh]
    assert graphs.adapter_state() == lg.adapter_state(base)
    with model.disable_adapter():  # flags are read live from the listed layers
        assert (
            graphs.adapter_state() == lg.adapter_state(base) != lg.adapter_state(tiny_model("llama").get_base_model())
        )
    assert not graphs.rescan(base)
    model.add_adapter("extra", LoraConfig(r=2, target_modules=["q_proj"]))
    assert graphs.rescan(base) and not graphs.rescan(base)
    assert len(graphs.slots()) == len(fresh) + 2 * 2  # A and B of the two layers' q_proj
    model.set_adapter("extra")
    assert graphs.adapter_state() == lg.adapter_state(base)
    assert {s[3] for s in graphs.adapter_state()} == {("extra",)}


def test_graphs_report_and_switch(monkeypatch):
    lm = tiny_model("llama", lora=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lg.graphed_logprobs(lm, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, torch.ones(1, 4), None) is None
    assert (
        lg.graphs_status(lm, {"cuda_graphs": "stock: CUDA graphs need a CUDA GPU"})
        == "off: CUDA graphs need a CUDA GPU"
    )
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    assert lg.graphs_status(lm, {}) == f"off: turned off by {cg.ENV_SWITCH}=0"
    lm.__dict__["_sftop_graphs"] = object()  # what the cuda_graphs part leaves when graphs may run
    assert lg.graphs_status(lm, {}).startswith("on: the policy forward+backward and the reference forward")


def test_dpo_guard_skips_a_non_finite_update_with_one_read_per_optimizer_step(tmp_path, monkeypatch):
    """The loss's finiteness is kept on the device and read with the gradient norm: a NaN loss with
    finite gradients still skips its update, and the trainer itself reads nothing per micro-batch."""
    import sys
    from pathlib import Path

    from transformers import TrainerCallback

    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.update_guard import UpdateGuard
    from test_dpo_logprob_head import _trainer

    class Poisoned(SftopDPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # the first optimizer step's loss is NaN, its gradients are not
            return loss + torch.tensor(float("nan") if self.state.global_step == 0 else 0.0, device=loss.device)

    class Snapshots(TrainerCallback):
        def __init__(self):
            self.weights = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights.append([p.detach().clone() for p in model.parameters() if p.requires_grad])

    model = tiny_model("llama")
    K.patch_model(model)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    guard, snaps = UpdateGuard(5), Snapshots()
    trainer = _trainer(
        Poisoned,
        model,
        tmp_path,
        "sigmoid",
        guard=guard,
        save_total_limit=1,
        kernel_head=True,
        callbacks=[guard, snaps],
    )
    trainer.args.max_steps = 2
    trainer.args.per_device_train_batch_size = 2
    trainer.args.logging_nan_inf_filter = False
    dpo_code = str(Path(sys.modules[SftopDPOTrainer.__module__].__file__))
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def read(t, *a, _original=original, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == dpo_code:
                reads.append(_name)
            return _original(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    trainer.train()
    monkeypatch.undo()
    assert reads == []
    assert len(snaps.weights) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, snaps.weights[0]))  # skipped
    assert any(not torch.equal(a, b) for a, b in zip(snaps.weights[0], snaps.weights[1]))  # trained
    assert guard.consecutive == 0 and not guard.failed


def test_graphed_path_through_trl_equals_eager_with_the_capture_run_directly(tmp_path, monkeypatch):
    """Everything around the capture, on a CPU: TRL's compute_loss calls the head, which takes the
    graphed path for the policy (with gradient) and the reference (adapter off, no gradient) forwards,
    with the captured function run directly in place of a replay.  Loss, metrics and LoRA gradients
    equal the eager head's; the two forwards have keys of their own, the reference's with every
    adapter layer disabled and read back from the device once; the reference runs first."""
    import trl

    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.update_guard import UpdateGuard
    from test_dpo_logprob_head import _trainer

    calls, reads, known = [], [], []
    real_check = lg.batch_check
    real_first_scored = lg.LogprobGraphs.first_scored

    def first_scored(self, *a, **k):
        known.append(k.get("known"))
        return real_first_scored(self, *a, **k)

    graph_inputs = []

    def run_directly(self, key, fn, inputs, slots, backward=True):
        calls.append((key, backward, torch.is_grad_enabled(), len(slots)))
        graph_inputs.append(inputs)
        return fn(*inputs)

    results = []
    for graphed in (False, True):
        model = tiny_model("llama")
        K.patch_model(model)
        trainer = _trainer(
            SftopDPOTrainer,
            model,
            tmp_path / str(graphed),
            "sigmoid",
            guard=UpdateGuard(5),
            save_total_limit=1,
            kernel_head=True,
        )
        base = model.get_base_model()
        if graphed:
            base.__dict__["_sftop_graphs"] = object()  # as the cuda_graphs part leaves it on a GPU
            monkeypatch.setattr(lg, "_capturable", lambda ids: True)
            monkeypatch.setattr(lg.StepGraphs, "replay", run_directly)
            monkeypatch.setattr(lg, "batch_check", lambda *a: reads.append(1) or real_check(*a))
            monkeypatch.setattr(lg.LogprobGraphs, "first_scored", first_scored)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert (batch["attention_mask"] == 0).any()  # right padding present
        model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        trainer.sftop_metrics.flush(trainer)
        results.append((loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads))
        monkeypatch.undo()
    assert isinstance(trainer, trl.DPOTrainer)
    (l_e, m_e, g_e), (l_g, m_g, g_g) = results
    assert rel_err(l_g, l_e) < 1e-5
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
        "logits/chosen",
        "logits/rejected",
        "mean_token_accuracy",
    ):
        assert m_g[key] == pytest.approx(m_e[key], rel=1e-5, abs=1e-6), key
    assert abs(m_e["rewards/margins"]) > 1e-3
    for a, b in zip(g_e, g_g):
        assert rel_err(b, a) < 1e-4
    # one batch check for both forwards, worked out by the collator on the host and handed to the
    # graphs (labels_from_one_batch): no forward reads it from the device.  TRL builds each
    # forward's labels afresh, from the same batch the same way, which is what makes that right
    assert len(calls) == 2 and len(reads) == 1 and len(known) == 2
    ok, first = real_check(batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100), batch["attention_mask"])
    assert known[0] is not None and (known[0].ok, known[0].first) == (bool(ok), int(first))
    (ids_ref, labels_ref), (ids_policy, labels_policy) = graph_inputs
    assert torch.equal(ids_ref, ids_policy) and torch.equal(labels_ref, labels_policy)
    assert lg.M.LABELS_FROM_ONE_BATCH not in model.get_base_model().__dict__
    # the reference forward first (its graph shares the policy's pool: cuda_graphs.StepGraphs)
    (ref_key, r_backward, r_grad, r_slots), (policy_key, p_backward, p_grad, p_slots) = calls
    assert (p_backward, p_grad, p_slots) == (True, True, 2 * 7 * 2)
    assert (r_backward, r_grad, r_slots) == (False, False, 0)  # PEFT froze the adapter while it is off
    assert policy_key != ref_key
    assert all(not s[1] for s in policy_key[-1]) and all(s[1] for s in ref_key[-1]) and len(ref_key[-1]) == 14


# ----------------------------------------------------------------------------------------- GPU


def _pairs(n_batches, seed=0):
    """Pre-tokenised pairs of varied lengths: each batch's padded length changes, its bucket does not."""
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return torch.randint(4, VOCAB, (k,), generator=g).tolist()

    rows = []
    for i in range(2 * n_batches):
        # prompts of 130+ tokens: every batch pads to 256 and the graphs start scoring at 128
        rows.append(
            {
                "prompt_ids": words(130 + i % 4),
                "chosen_ids": words(6 + (3 * i) % 7),
                "rejected_ids": words(4 + (5 * i) % 9),
            }
        )
    return rows


def _dpo_steps(model, tmp_path, batches, accumulate=1, peaks=None):
    """Each optimizer step's DPO loss, rewards, LoRA gradients and batch through TRL's compute_loss
    (reference forward with the adapter off, policy forward, backward), with an SGD update after
    every `accumulate` micro-batches (the last micro-batch's loss, metrics and batch).  `peaks`: a
    list that gets each optimizer step's peak allocated bytes."""
    import datasets
    import trl

    from sftop.engine.train.dpo import SftopDPOTrainer
    from sftop.engine.train.update_guard import UpdateGuard
    from test_trl_compat import _tokenizer

    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        report_to=[],
        bf16=True,
        max_length=None,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        loss_type=["sigmoid"],
        beta=0.5,
        save_strategy="no",
    )
    trainer = SftopDPOTrainer(
        model=model,
        args=args,
        processing_class=_tokenizer(),
        train_dataset=datasets.Dataset.from_list(_pairs(1)),
        guard=UpdateGuard(5),
        save_total_limit=1,
        kernel_head=True,
    )
    assert trainer.sftop_head == "fused" and trainer.sftop_reference == "adapter off"
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # plain SGD: the two runs' weights drift apart only in proportion to their gradients' rounding
    # (Adam's sign-like first steps would magnify it); steps of up to ~4e-2 on weights of ~0.2
    opt = torch.optim.SGD(params, lr=0.01)
    out = []
    for i, rows in enumerate(batches):
        if peaks is not None and i % accumulate == 0:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in trainer.data_collator(rows).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        if (i + 1) % accumulate:
            continue
        trainer.sftop_metrics.flush(trainer)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        grads = [p.grad.float().clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if peaks is not None:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        out.append((loss.item(), metrics, grads, batch))
    return out, trainer


@pytest.mark.gpu
@needs_gpu
def test_graphed_dpo_step_matches_eager_and_replays_both_forwards(tmp_path, monkeypatch):
    graphed = tiny_model("llama", dtype=torch.bfloat16)
    eager = twin(graphed)
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    assert K.patch_model(eager).parts["cuda_graphs"].startswith("stock: turned off")
    monkeypatch.delenv(cg.ENV_SWITCH)
    assert K.patch_model(graphed).parts["cuda_graphs"] == "fused"
    rows = _pairs(5)
    batches = [rows[2 * i : 2 * i + 2] for i in range(5)]
    ref, _ = _dpo_steps(eager, tmp_path / "eager", batches)
    got, trainer = _dpo_steps(graphed, tmp_path / "graphed", batches)
    assert lg.graph_stats(eager.get_base_model()) is None  # graphs off: never reached
    stats = lg.graph_stats(graphed.get_base_model())
    # both forwards run eagerly on the first batch; the policy's is captured on the second (and
    # replayed), the reference's on the third, after the policy's (cuda_graphs.StepGraphs.replay);
    # the rest replay
    assert (stats.eager_calls, stats.captures, stats.replays) == (3, 2, 7), stats
    assert stats.failures == []
    assert len({b["input_ids"].shape[1] for *_x, b in ref}) > 1  # lengths changed, one bucket
    for *_x, b in ref:
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        ok, first = lg.batch_check(labels, b["attention_mask"]).tolist()
        assert ok == 1 and lg.scored_start(first, lg.padded_length(b["input_ids"].shape[1])) == 128
    assert trainer.sftop_graphs.startswith("on:")
    # bf16: eager and graphed differ in attention kernels (masked vs plain causal) and matmul shapes
    # (rows padded to 256), i.e. in rounding: sequence log-probs (about -50 here) may differ by
    # 2e-3 of their size, the rewards (beta x a difference of two of them) by twice that times beta,
    # the loss by at most the margin's error; LoRA gradients by 3e-2 relative
    beta = 0.5
    for (l_e, m_e, g_e, _b), (l_g, m_g, g_g, _b2) in zip(ref, got):
        tol_logp = 2e-3 * max(abs(m_e["logps/chosen"]), abs(m_e["logps/rejected"]))
        tol_reward = beta * 2 * tol_logp
        for key, tol in (
            ("logps/chosen", tol_logp),
            ("logps/rejected", tol_logp),
            ("rewards/chosen", tol_reward),
            ("rewards/rejected", tol_reward),
        ):
            assert abs(m_g[key] - m_e[key]) <= tol, (key, m_e[key], m_g[key], tol)
        assert abs(l_g - l_e) <= 2 * tol_reward, (l_e, l_g)
        for a, b in zip(g_e, g_g):
            assert a.abs().sum() > 0
            assert rel_err(b, a) < 3e-2
    assert abs(ref[0][1]["rewards/margins"]) > 1e-2  # policy != reference from the start (B != 0)


@pytest.mark.gpu
@needs_gpu
def test_reference_graph_runs_with_the_adapter_off(tmp_path):
    # alpha 32: the adapter moves the log-probs by about 4e-2 relative (measured in bf16 on a CPU)
    model = tiny_model("llama", dtype=torch.bfloat16, lora_alpha=32)
    plain = tiny_model("llama", dtype=torch.bfloat16, lora=False)  # the same base weights (same seed)
    assert K.patch_model(model).parts["cuda_graphs"] == "fused"
    rows = _pairs(3)
    batches = [rows[2 * i : 2 * i + 2] for i in range(3)]
    _steps, trainer = _dpo_steps(model, tmp_path, batches)
    base = model.get_base_model()
    stats = lg.graph_stats(base)
    assert stats.captures == 2, stats
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in trainer.data_collator(batches[-1]).items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    )
    replays = stats.replays
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.gradient_checkpointing_disable()  # as TRL's reference forward does
        with model.disable_adapter():
            ref = model(**kwargs).log_probs
        policy = model(**kwargs).log_probs  # adapter on, no grad: a forward-only graph of its own
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert stats.replays == replays + 1  # the reference call replayed its graph (the policy one is new)
    counted = labels[:, 1:] != -100
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    want = want * counted
    err_ref = rel_err(ref[counted], want[counted])
    err_policy = rel_err(policy[counted], want[counted])
    # sftop's kernels against HF's stock forward differ by bf16 rounding only (3e-4 on a CPU)
    assert err_ref < 5e-3, err_ref
    assert err_policy > 2e-2, (err_ref, err_policy)  # the adapter does change them


@pytest.mark.gpu
@needs_gpu
def test_graphed_dpo_with_gradient_accumulation_matches_eager(tmp_path, monkeypatch):
    """Two micro-batches per optimizer step: the second micro-batch's reference replay runs while the
    parameters' .grad still holds the first one's gradients, which were handed out over the
    policy graph's static buffers in the pool the reference graph shares; they must come through."""
    graphed = tiny_model("llama", dtype=torch.bfloat16)
    eager = twin(graphed)
    monkeypatch.setenv(cg.ENV_SWITCH, "0")
    K.patch_model(eager)
    monkeypatch.delenv(cg.ENV_SWITCH)
    assert K.patch_model(graphed).parts["cuda_graphs"] == "fused"
    rows = _pairs(8, seed=1)
    batches = [rows[2 * i : 2 * i + 2] for i in range(8)]
    ref, _ = _dpo_steps(eager, tmp_path / "eager", batches, accumulate=2)
    got, _ = _dpo_steps(graphed, tmp_path / "graphed", batches, accumulate=2)
    stats = lg.graph_stats(graphed.get_base_model())
    assert (stats.eager_calls, stats.captures, stats.replays) == (3, 2, 13), stats
    assert len(ref) == len(got) == 4
    for (_l_e, _m_e, g_e, _b), (_l_g, _m_g, g_g, _b2) in zip(ref, got):
        for a, b in zip(g_e, g_g):
            assert a.abs().sum() > 0
            assert rel_err(b, a) < 3e-2


def _wide_vocab_llama():
    """A bf16 Llama whose LM head dominates a step's transients, as in real models (Llama 3's vocabulary
    on a narrow backbone): the logits of a few hundred positions are 125 MiB."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=128256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules=LORA_TARGETS)
    return get_peft_model(model, lora)


def _long_answer_pairs(n_batches):
    """Prompts of 130 tokens and answers of about 120: the eager head scores about as many positions
    (the answers) as the graphs do (the second half of the 256-token bucket)."""
    g = torch.Generator().manual_seed(2)

    def words(k):
        return torch.randint(4, VOCAB, (k,), generator=g).tolist()

    return [
        {"prompt_ids": words(130), "chosen_ids": words(118 + i % 5), "rejected_ids": words(120 - i % 3)}
        for i in range(2 * n_batches)
    ]


def _pool_bytes(graphs) -> tuple[int, int]:
    """(reserved, idle) bytes of one StepGraphs' memory pool."""
    reserved = idle = 0
    for seg in torch.cuda.memory_snapshot():
        if graphs._pool is not None and tuple(seg.get("segment_pool_id", (0, 0))) == tuple(graphs._pool):
            reserved += seg["total_size"]
            idle += seg["total_size"] - seg["allocated_size"]
    return reserved, idle


# what a graphed step may hold beyond the eager step's peak: the pool's rounding (blocks round up to
# 2 MiB, mid-sized ones share 20 MiB segments) and the few more positions the graphs score (their
# 256-token bucket's second half against the answers); a pool of its own for the reference forward
# would add its transients, about 130 MiB here (the logits of 512 positions over 128,256 tokens)
PEAK_MARGIN = 48 << 20


@pytest.mark.gpu
@needs_gpu
def test_graphed_dpo_step_peaks_no_higher_than_the_eager_step(tmp_path, monkeypatch):
    """The graphed step's device memory in steady state (allocated at its peak, plus the pool's idle
    blocks, which hold the replays' transients that the allocator's statistics never see) stays
    within PEAK_MARGIN of the eager step's peak: the reference forward's graph shares the policy
    step's pool instead of keeping one of its own."""
    rows = _long_answer_pairs(5)
    batches = [rows[2 * i : 2 * i + 2] for i in range(5)]
    measured = {}
    for graphs_on in (False, True):
        # relative to what is allocated before the model is built: whatever an earlier run (or
        # test) left alive counts for neither
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = _wide_vocab_llama()
        if graphs_on:
            monkeypatch.delenv(cg.ENV_SWITCH, raising=False)
        else:
            monkeypatch.setenv(cg.ENV_SWITCH, "0")
        assert K.patch_model(model).parts["cuda_graphs"] == (
            "fused" if graphs_on else "stock: turned off by SFTOP_CUDA_GRAPHS=0"
        )
        peaks: list[int] = []
        _steps, trainer = _dpo_steps(model, tmp_path / str(graphs_on), batches, peaks=peaks)
        steady = max(peaks[3:]) - before  # after the first sighting (eager) and the captures
        if graphs_on:
            graphs = model.get_base_model().__dict__[lg.M.LOGPROB_GRAPHS].steps
            stats = graphs.stats
            assert (stats.eager_calls, stats.captures, stats.replays) == (3, 2, 7), stats
            reserved, idle = _pool_bytes(graphs)
            assert reserved >= lg.CHUNK_BYTES  # the logits' chunk lived in it
            steady += idle
        measured[graphs_on] = steady
        del model, trainer, _steps
    eager, graphed = measured[False], measured[True]
    assert graphed <= eager + PEAK_MARGIN, (eager / 2**20, graphed / 2**20)
