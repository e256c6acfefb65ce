"""A short LoRA training run, patched vs stock: the loss curves must stay together."""

import torch

import sftop.kernels as K

from _tiny_models import DEVICE, VOCAB, tiny_model, twin

STEPS = 20
# fp32 everywhere; the two runs differ only in summation order inside the kernels, which AdamW's
# normalised updates can amplify a little over 20 steps, so 1e-4 relative per step is the bound.
TOLERANCE = 1e-4


def _run(model, data):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(STEPS):
        ids, labels = data[step % len(data)]
        # two micro-batches per optimiser step, each divided by the step's token count
        micro = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
        n_items = sum(int((lab[:, 1:] != -100).sum()) for _, lab in micro)
        total = 0.0
        for mi, ml in micro:
            loss = model(input_ids=mi, labels=ml, num_items_in_batch=torch.tensor(n_items)).loss
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_twenty_adamw_steps_track_stock():
    g = torch.Generator().manual_seed(7)
    # a learnable signal: each row repeats a short random pattern, with a masked "prompt"
    pat = torch.randint(3, VOCAB, (4, 5), generator=g)
    ids = pat.repeat(1, 4)
    labels = ids.clone()
    labels[:, :3] = -100
    data = [(ids.to(DEVICE), labels.to(DEVICE))]
    # standard LoRA init (B = 0), as a real run starts
    stock = tiny_model("llama", seed=1, init_lora_weights=True)
    fused = twin(stock)
    assert K.patch_model(fused).any_fused
    s_curve = _run(stock, data)
    f_curve = _run(fused, data)
    assert s_curve[-1] < s_curve[0] * 0.9, "the run should learn something"
    for step, (s, f) in enumerate(zip(s_curve, f_curve)):
        assert abs(f - s) <= TOLERANCE * abs(s), (step, s, f)
