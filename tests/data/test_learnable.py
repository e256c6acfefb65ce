"""The demo's promise: a tiny model visibly learns builtin:arithmetic in the demo preset's steps on a CPU.

A plain torch loop (not the trainer) over what `prepare_data` produces, with the demo preset's
LoRA settings, so a change to the built-in set or the demo model that breaks the demo shows here.
"""

import random

import pytest
import torch

from sftop.engine.data import prepare_data
from sftop.engine.data.tokenize import IGNORE_INDEX
from sftop.engine.presets import load_preset


def _batch(rows, pad_id):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a)], labels[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.slow
def test_demo_arithmetic_loss_halves_within_the_demo_steps():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftop.engine.models import load_tokenizer
    from sftop.engine.models.tokenizer import resolve_model_source

    preset, _ = load_preset("demo")
    tok = load_tokenizer(preset.model)
    data = prepare_data(preset, tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(preset.model), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=preset.lora.r, lora_alpha=preset.lora.alpha,
                                             target_modules="all-linear", lora_dropout=0.0))
    rows = list(zip(data.train["input_ids"], data.train["labels"]))
    random.Random(0).shuffle(rows)
    held_out, rows = _batch(rows[:128], tok.pad_token_id), rows[128:]

    def eval_loss():
        with torch.no_grad():
            return model(**held_out).loss.item()

    steps, batch = preset.train.max_steps, preset.train.effective_batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=preset.train.learning_rate, weight_decay=0.0)
    warm = 3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else (steps - s) / (steps - warm))
    before = eval_loss()
    for step in range(steps):
        loss = model(**_batch(rows[step * batch:(step + 1) * batch], tok.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    after = eval_loss()
    print(f"held-out assistant-token loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)
