"""`builtin:demo-tiny`: a tiny random-init Llama with its own tokenizer, built locally and cached.

It is saved in Hugging Face format so that it goes through exactly the same loading code as a hub
model: the demo exercises the real path, not a shortcut. Building is deterministic (fixed seeds and
a generated corpus), takes a couple of seconds, and happens once per cache directory.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from sftop.engine.paths import cache_dir

DEMO_NAME = "builtin:demo-tiny"
BUILTIN_PREFIX = "builtin:"
# Bump when the recipe changes so old caches are rebuilt instead of silently reused.
DEMO_VERSION = "1"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

# ChatML with `{% generation %}` markers so assistant-only loss masks can be computed from it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_SIZE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
# A random LM head at the usual 0.02 scale caps the logits near +-5 (the final RMSNorm fixes the
# hidden-state norm), so LoRA alone could never make a confident prediction. A wider head lets the
# adapter learn sharp answers while the base stays a plain random-init Llama.
LM_HEAD_STD = 0.1
VOCAB_SIZE = 512

_WORDS = (
    "the quick brown fox jumps over lazy dog hello world python sftop train model data token "
    "reverse add subtract multiply what is answer question sum of and plus minus times equals "
    "please compute write backwards letters number small large learn fast slow tiny demo yes no"
).split()


def demo_dir() -> Path:
    return cache_dir() / "models" / "demo-tiny"


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def _corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Text shaped like sftop's built-in data: arithmetic, word reversal, chat markers."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        word = rng.choice(_WORDS)
        kind = i % 4
        if kind == 0:
            user, answer = f"What is {a} + {b}?", str(a + b)
        elif kind == 1:
            user, answer = f"Compute {a} - {b}.", str(a - b)
        elif kind == 2:
            user, answer = f"Reverse the word: {word}", word[::-1]
        else:
            user = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."
            answer = f"{a} * {b} = {a * b}; ok!"
        lines.append(f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n")
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]{}<>/\\|-_+=*&^%$#@~`")
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # One token per digit: multi-digit tokens make arithmetic much harder to learn.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MODEL_SIZE["max_position_embeddings"]
    return fast


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SIZE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def ensure_demo_model() -> Path:
    """Return the cached demo model directory, building it first if needed.

    The build goes into a temp directory that is renamed into place, so a crash or a concurrent
    build never leaves a half-written model where a loader would find it.
    """
    target = demo_dir()
    marker = target / "sftop-demo-version"
    if marker.is_file() and marker.read_text().strip() == DEMO_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tiny-build-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sftop-demo-version").write_text(DEMO_VERSION + "\n")
        if target.exists():
            # A stale build from an older recipe: move it aside first so the rename is atomic.
            old = target.with_name(f".demo-tiny-old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is as good as ours.
            if not (marker.is_file() and marker.read_text().strip() == DEMO_VERSION):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
