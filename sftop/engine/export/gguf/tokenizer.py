"""The tokenizer as GGUF metadata: vocabulary, merges or scores, token types, special ids, chat template.

Two kinds of Hugging Face tokenizer are written, read from the tokenizer's own `tokenizer.json`:

- byte-level BPE (GPT-2 style: Llama 3, Qwen, Mistral's Tekken, sftop's demo model) as
  `tokenizer.ggml.model = gpt2`, with its merges and the name of the pre-tokenizer (the regex that
  splits text before merging) that llama.cpp should apply;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral up to v0.3, Gemma) as
  `tokenizer.ggml.model = llama`, with scores that order the pieces as the merges do (a piece made
  by an earlier merge scores higher; single characters score below every merged piece), and the
  merges too, for readers that rebuild a BPE from them.

Anything else (WordPiece, Unigram) is refused before any work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import gguf
from gguf import TokenType

from sftop.engine.errors import SftopError

# The pre-tokenizer regexes llama.cpp knows by name, keyed by the pattern a tokenizer.json holds.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", TEKKEN_SPLIT: "tekken"}

# Hugging Face chat templates mark the assistant's turns for training-time loss masks; no inference
# engine knows these tags, and a Jinja engine without them fails to parse the template.
GENERATION_TAGS = re.compile(r"\{%-?\s*(?:generation|endgeneration)\s*-?%\}")

BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass
class Vocabulary:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _walk(node):
    """Every component of a (possibly nested Sequence) pre-tokenizer/normalizer/decoder."""
    if not node:
        return
    yield node
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        for child in node.get(key) or []:
            yield from _walk(child)


def _pre_tokenizer_name(spec: dict) -> str:
    parts = list(_walk(spec.get("pre_tokenizer")))
    splits = [p["pattern"].get("Regex") for p in parts if p["type"] == "Split" and isinstance(p.get("pattern"), dict)]
    for pattern in splits:
        if pattern in KNOWN_SPLITS:
            return KNOWN_SPLITS[pattern]
    byte_level = [p for p in parts if p["type"] == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        # GPT-2's own regex. A `Digits(individual_digits)` step before it (sftop's demo model) only
        # splits further where the vocabulary never merges anyway (it has no multi-digit tokens).
        return "gpt-2"
    described = ", ".join(p["type"] for p in parts) or "none"
    raise SftopError(
        f"The tokenizer's pre-tokenizer ({described}) is not one llama.cpp knows by name, so the GGUF "
        "file would split text differently from the model",
        where="tokenizer.json: pre_tokenizer",
        hint="Export a merged Hugging Face model instead (`sftop export RUN --merged`)",
    )


def _merge_strings(merges) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def read_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """Everything GGUF needs from a fast Hugging Face tokenizer, padded to the model's `vocab_size`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SftopError(
            "The tokenizer has no `tokenizer.json` (a fast tokenizer), which GGUF export reads",
            where="tokenizer",
            hint="Save the tokenizer with `tokenizers` installed, then export again",
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SftopError(
            f"GGUF export writes BPE tokenizers; this one is {model.get('type')}",
            where="tokenizer.json: model.type",
            hint="Export a merged Hugging Face model instead (`sftop export RUN --merged`)",
        )
    byte_level = any(p["type"] == "ByteLevel" for p in _walk(spec.get("pre_tokenizer"))) or any(
        p["type"] == "ByteLevel" for p in _walk(spec.get("decoder"))
    )
    if not byte_level and not model.get("byte_fallback"):
        raise SftopError(
            "The tokenizer is neither byte-level BPE nor BPE with byte fallback, so llama.cpp "
            "could not encode every text with it",
            where="tokenizer.json: model",
            hint="Export a merged Hugging Face model instead (`sftop export RUN --merged`)",
        )

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    for i, entry in added.items():
        by_id[i] = entry["content"]
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    unk = model.get("unk_token")
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            # The embedding has rows no token uses (padded for speed): name them so ids stay aligned.
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
            tokens.append(token)
        elif token == unk:
            types.append(TokenType.UNKNOWN)
            tokens.append(token)
        elif not byte_level and BYTE_PIECE.match(token):
            types.append(TokenType.BYTE)
            tokens.append(token)
        else:
            types.append(TokenType.NORMAL)
            tokens.append(token)

    merges = _merge_strings(model.get("merges", []))
    scores = None if byte_level else _spm_scores(tokens, types, merges)
    vocab = Vocabulary(
        model="gpt2" if byte_level else "llama",
        pre=_pre_tokenizer_name(spec) if byte_level else None,
        tokens=tokens,
        types=[int(t) for t in types],
        merges=merges,
        scores=scores,
    )
    _special_ids(vocab, tokenizer)
    if not byte_level:
        vocab.add_space_prefix = _adds_space_prefix(spec)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab.chat_template = GENERATION_TAGS.sub("", template)
    return vocab


def _spm_scores(tokens: list[str], types: list[TokenType], merges: list[str]) -> list[float]:
    """Scores in (-3, -1]: a piece made by merge number r scores -(1 + r/len(merges)), single characters
    score below every merged piece.

    llama.cpp merges the adjacent pair whose result scores highest, so only the order matters to it,
    and this order is the merges' own. Keeping every score near -1 as well makes a reader that picks
    the highest-scoring segmentation instead (transformers' Gemma reader) prefer the same few long
    pieces that the merges produce, rather than many short early ones.
    """
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    merged, size = float(max(len(merges), 1)), float(len(tokens))
    scores = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind != TokenType.NORMAL:
            scores.append(0.0)
        elif token in rank:
            scores.append(-(1.0 + rank[token] / merged))
        else:
            scores.append(-(2.0 + i / size))
    return scores


def _adds_space_prefix(spec: dict) -> bool:
    for part in list(_walk(spec.get("normalizer"))) + list(_walk(spec.get("pre_tokenizer"))):
        if part["type"] == "Prepend" and part.get("prepend") == "▁":
            return True
        if part["type"] == "Metaspace" and part.get("prepend_scheme", "always") != "never":
            return True
    return False


def _special_ids(vocab: Vocabulary, tokenizer) -> None:
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            vocab.special[name] = int(token_id)
    probe = tokenizer("a")["input_ids"]
    vocab.add_bos = "bos" in vocab.special and probe[:1] == [vocab.special["bos"]]
    vocab.add_eos = "eos" in vocab.special and probe[-1:] == [vocab.special["eos"]] and len(probe) > 1
    if "bos" not in vocab.special and "eos" in vocab.special:
        # Models without a BOS (Qwen, the demo) still name one, never added: some readers expect it.
        vocab.special["bos"] = vocab.special["eos"]


def write_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, token_id in vocab.special.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
