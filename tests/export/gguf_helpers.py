"""Runs to export without training: a saved tiny base model, a real PEFT adapter with non-zero
weights (so the merge changes the outputs), and the run's preset pointing at that base."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftop.engine.presets import load_preset
from sftop.engine.presets.loader import save_preset

SAMPLE = "What is 12 + 30?\nThe quick brown fox: 42 letters, (maybe) 7!"


def make_run(run_dir: Path, base_dir: Path, model, tokenizer, seed: int = 0, targets=None) -> Path:
    """A finished-looking run of `model` at `base_dir`, with an adapter whose B is not zero."""
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    run_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    preset, _ = load_preset("demo", [f'model.name="{base_dir}"', 'model.dtype="fp32"'])
    save_preset(preset, run_dir / "preset.toml")
    return run_dir


# --- tiny tokenizers of each family's kind (trained locally in well under a second) ----------------

CORPUS = [
    "What is 12 + 30? The answer is 42.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you today? I'm fine, thanks!",
    "Reverse the word: letters -> srettel",
    "first line\nsecond line\n\nthird (and last) line",
    "user assistant system model",
] * 30

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }}"
    " [/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else 'user' }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def byte_level_tokenizer(split: str, specials: list[str], bos: str | None, eos: str, template: str, pad=None):
    """GPT-2 style BPE behind a regex split, as Llama 3 and Qwen ship them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template
    )


def sentencepiece_bpe_tokenizer(
    specials: list[str], bos: str, eos: str, template: str, gemma: bool, extra_specials: list[str] = ()
):
    """SentencePiece-style BPE with byte fallback: Llama 2 / Mistral (a `▁` before the text) or
    Gemma (spaces become `▁`, nothing prepended)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=360, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "▁")
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([] if gemma else [decoders.Strip(" ", 1, 0)])
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    if extra_specials:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra_specials])
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>", chat_template=template
    )


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILY_CASES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def family_tokenizer(family: str):
    from sftop.engine.export.gguf.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

    if family == "llama":
        return byte_level_tokenizer(LLAMA3_SPLIT, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE)
    if family in ("qwen2", "qwen3"):
        return byte_level_tokenizer(
            QWEN2_SPLIT, QWEN_SPECIALS, None, "<|im_end|>", CHATML_TEMPLATE, pad="<|endoftext|>"
        )
    if family == "mistral":
        return sentencepiece_bpe_tokenizer(
            ["<unk>", "<s>", "</s>"], "<s>", "</s>", MISTRAL_TEMPLATE, gemma=False, extra_specials=["[INST]", "[/INST]"]
        )
    return sentencepiece_bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        "<bos>",
        "<end_of_turn>",
        GEMMA_TEMPLATE,
        gemma=True,
        extra_specials=["<start_of_turn>", "<end_of_turn>"],
    )


def family_model(family: str, tokenizer, seed: int = 0):
    """A tiny random model of `family`. Where transformers' GGUF reader cannot carry a setting
    (Qwen3's head_dim, Gemma's query scaling, soft-caps and layer pattern), the config keeps the
    reader's default, so that the reader rebuilds the same model; llama.cpp reads them from the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(
        vocab_size=len(tokenizer) + 3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    extra = {
        "llama": dict(head_dim=32, tie_word_embeddings=False),
        "mistral": dict(head_dim=32, sliding_window=None, tie_word_embeddings=False),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(head_dim=128, tie_word_embeddings=True),
        "gemma2": dict(head_dim=32),
        "gemma3_text": dict(head_dim=32),
    }[family]
    config = AutoConfig.for_model(family, **shape, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # Gemma's norms start at zero: make the (1 + w) path non-trivial everywhere
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()
