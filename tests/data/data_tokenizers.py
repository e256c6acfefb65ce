"""Tiny local tokenizers with chat templates, so data tests never touch the hub.

Two tokenizers (character-level, and byte-level BPE trained on a small corpus, which merges
across turn boundaries the way real ones do) and two templates: ChatML (Qwen-like, with a newline
after each end-of-turn token) and a Llama-3-like one. Neither template has `{% generation %}`
markers, so masks must come from sftop's incremental rendering.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = [
    "<pad>",
    "<unk>",
    "<|begin_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}

CORPUS = [
    "What is 7+5? 12",
    "Reverse: kato otak",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system",
    "Answer with the result only.",
    "Hello there, how are you today?",
    "instruction input output",
    "Q: What is 3+4?\nA: 7",
    "first\n\nsecond\n\n12",
] * 20


def _char_tokenizer() -> Tokenizer:
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def make_tokenizer(kind: str = "char", template: str = "chatml") -> PreTrainedTokenizerFast:
    backend = _char_tokenizer() if kind == "char" else _bpe_tokenizer()
    eos = END_OF_TURN[template]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token=eos,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIALS if t not in ("<pad>", "<unk>", "<|begin_of_text|>", eos)],
        chat_template=TEMPLATES[template],
    )
