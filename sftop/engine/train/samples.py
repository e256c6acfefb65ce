"""Greedy answers to a few fixed prompts during training: the run's learning made visible.

`train.sample_prompts` lists user prompts; at each evaluation the model answers them and a
`samples` event records the answers (the dashboard's samples pane shows the newest).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from sftop.engine.events import EventWriter, Message, Samples

MAX_NEW_TOKENS = 48


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Each prompt as one user turn through the chat template, answered by greedy decoding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                inputs = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    return_tensors="pt",
                    return_dict=True,
                )
                inputs = {k: v.to(device) for k, v in inputs.items()}
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new = out[0, inputs["input_ids"].shape[1] :]
                answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    finally:
        if was_training:
            model.train()
    return answers


def sample_interval(train_section) -> int:
    return int(train_section.eval_steps or train_section.save_steps)


class SampleAnswers(TrainerCallback):
    """Writes a `samples` event every `interval` steps and after the last one."""

    def __init__(self, writer: EventWriter, tokenizer, prompts: list[str], interval: int):
        self.writer = writer
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.interval = max(1, interval)
        self.failed = False
        self._last_step: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs: Any):
        step = state.global_step
        if not self.prompts or self.failed or model is None or step == self._last_step:
            return
        if step % self.interval and step != state.max_steps:
            return
        self._last_step = step
        try:
            answers = generate_answers(model, self.tokenizer, self.prompts)
        except Exception as exc:  # noqa: BLE001 - samples are a view; they must never end a run
            self.failed = True
            self.writer.write(
                Message(
                    level="warning",
                    text=f"Sample answers turned off: generating them failed ({type(exc).__name__}: {exc})",
                )
            )
            return
        for prompt, answer in zip(self.prompts, answers):
            print(f"sample step {step}: {prompt!r} -> {answer!r}", flush=True)
        self.writer.write(
            Samples(step=step, samples=[{"prompt": p, "answer": a} for p, a in zip(self.prompts, answers)])
        )
