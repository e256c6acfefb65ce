"""Turn conversations into `input_ids` and `labels` with exact loss masks.

The chat template decides what the model sees. To find which tokens belong to assistant turns
without relying on `{% generation %}` markers (most templates lack them), each assistant turn is
located by rendering the conversation up to it twice: once ending in the generation prompt (where
the assistant starts writing) and once including the turn. Where both renders are prefixes of
the full render, their lengths are the turn's character span (templates that are not
prefix-stable get the narrower fallbacks in `_turn_start` and `_end_by_content`). Character positions are then mapped to
token positions: where one token ends exactly at the boundary and the next starts there (offsets),
that is the split; otherwise the prefix is tokenised and checked token by token against the start
of the full sequence; only where a merge crosses the boundary do we fall back to the token that
straddles it, and count it as trained.

A turn's span ends with the template's end-of-turn token (trained: the model must learn to stop),
but whitespace the template puts after that special token (ChatML's newline) is not trained,
since generation stops before it.

Rows longer than `data.max_length` are skipped and reported, never silently truncated.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterator

from sftop.engine.data.conversation import Conversation
from sftop.engine.data.formats import RowError
from sftop.engine.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source_index: int

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _template_error_text(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


class Encoder:
    """Encodes conversations for one tokenizer and one `data` section."""

    def __init__(self, tokenizer, *, loss_on: str = "assistant", max_length: int | None = None):
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.max_length = max_length
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
        self._whitespace_cache: dict[int, bool] = {}
        self._starts_of = None
        self._starts_cache: list[int] = []
        self._max_chars: int | None = None

    # -- length, before tokenising --------------------------------------------------------------

    def max_chars(self) -> int | None:
        """More characters than this cannot fit in data.max_length tokens, whatever they are.

        No token spans more characters than the longest entry of the vocabulary (byte-level vocabularies
        spell each byte as one character, so this bounds the real text too); twice that covers
        normalisers that drop characters. A 50 MB row is then rejected by its length alone, in
        microseconds, instead of after minutes of tokenising and gigabytes of memory.
        """
        if self.max_length is None:
            return None
        if self._max_chars is None:
            try:
                longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
            except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary listing: no pre-check
                return None
            self._max_chars = self.max_length * max(1, longest) * 2
        return self._max_chars

    def check_chars(self, conv: Conversation) -> None:
        limit = self.max_chars()
        if limit is None:
            return
        chars = len(conv.document) if conv.document is not None else sum(len(m.text_content) for m in conv.messages)
        if chars > limit:
            raise RowError(
                f"{chars:,} characters, far more than data.max_length = {self.max_length} tokens can hold "
                "(rejected before tokenising)"
            )

    # -- chat ---------------------------------------------------------------------------------

    def require_chat_template(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or "this model"
            raise DataError(
                f"The tokenizer of {name} has no chat template, so chat rows cannot be formatted",
                where="model.name",
                hint=(
                    "Use an instruct/chat model (they ship a template), or give the data as plain `text` "
                    'rows and set data.format = "text"'
                ),
            )

    def template_messages(self, conv: Conversation) -> list[dict]:
        """The messages as the chat template receives them (string content for text models; the
        vision collator passes content parts so the template places the images)."""
        return conv.template_messages()

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str, *, offsets: bool = False):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
        return enc

    def _is_whitespace_token(self, token_id: int) -> bool:
        cached = self._whitespace_cache.get(token_id)
        if cached is None:
            cached = self.tokenizer.decode([token_id]).strip() == ""
            self._whitespace_cache[token_id] = cached
        return cached

    def assistant_spans(self, conv: Conversation, full: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `full`, found by incremental rendering."""
        messages = self.template_messages(conv)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                before = self.render(messages[:i], add_generation_prompt=True)
                through = self.render(messages[: i + 1])
            except Exception as exc:  # noqa: BLE001 - a template's raise_exception() lands here
                raise RowError(f"the chat template rejected it: {_template_error_text(exc)}") from None
            start = self._turn_start(messages, i, before, full)
            if start >= 0 and full.startswith(through) and len(through) >= start:
                end = len(through)
            elif start >= 0:
                # Some templates render the last assistant turn differently from earlier ones (Qwen3
                # adds an empty think block to the last, Phi-3 an end-of-text after it). The turn
                # ends after its content and as much of the closing text as the full render shares.
                end = self._end_by_content(full, through, m["content"], start)
            else:
                end = -1
            if end < start or (spans and start < spans[-1][1]):
                raise RowError(
                    f"the chat template renders message {i} differently once later messages follow, "
                    "so its trained tokens cannot be located (split the conversation into one row per assistant turn, "
                    'or set data.loss_on = "all")'
                )
            spans.append((start, end))
        return spans

    def _turn_start(self, messages: list[dict], i: int, before: str, full: str) -> int:
        """Where assistant message `i` starts in `full`: the end of the generation prompt.

        Some templates' generation prompt opens a think block (`<think>\n`) that earlier turns do
        not have in the full render; then the turn starts where the two renders part, provided
        that is after everything rendered for the earlier messages (so no earlier text is trained).
        """
        if full.startswith(before):
            return len(before)
        shared = _common_prefix_len(before, full)
        try:
            previous = self.render(messages[:i]) if i else ""
        except Exception:  # noqa: BLE001 - a template may refuse to end on a user turn; no fallback then
            return -1
        if full.startswith(previous) and shared >= len(previous):
            return shared
        return -1

    def _end_by_content(self, full: str, through: str, content: str, start: int) -> int:
        content = content.strip()  # templates often trim
        at = through.rfind(content) if content else -1
        found = full.find(content, start) if at >= 0 else -1
        if found < 0:
            return -1
        after = found + len(content)
        tail = through[at + len(content) :]
        shared = _common_prefix_len(tail, full[after:])
        if 0 < shared < len(tail) and getattr(self.tokenizer, "is_fast", False):
            # Cut at a token boundary of the closing text: "<|end|>\n<|im_end|>" and
            # "<|end|>\n<|user|>" share "<|end|>\n<|", and half a special token is no boundary.
            offsets = self._ids(tail, offsets=True)["offset_mapping"]
            shared = max((e for _, e in offsets if e <= shared), default=0)
        return after + shared

    def _char_to_token(self, full: str, ids: list[int], offsets, boundary: int, *, is_end: bool) -> int:
        """Index of the first token at or after character `boundary` of `full`."""
        if boundary >= len(full):
            return len(ids)
        if offsets is not None:
            # Fast exact case: one token ends at the boundary and the next starts there.
            t = bisect.bisect_left(self._starts(offsets), boundary)
            if 0 < t < len(ids) and offsets[t][0] == boundary and offsets[t - 1][1] == boundary:
                return t
        prefix_ids = self._ids(full[:boundary])["input_ids"]
        if ids[: len(prefix_ids)] == prefix_ids:
            return len(prefix_ids)
        # A token straddles the boundary. Count it as part of the trained span on either side.
        if offsets is None:
            raise RowError("a token crosses an assistant-turn boundary and this tokenizer gives no offsets")
        if is_end:
            return next((t for t, (s, _) in enumerate(offsets) if s >= boundary), len(ids))
        return next((t for t, (_, e) in enumerate(offsets) if e > boundary), len(ids))

    def _starts(self, offsets) -> list[int]:
        if self._starts_of is not offsets:
            self._starts_cache = [start for start, _ in offsets]
            self._starts_of = offsets
        return self._starts_cache

    def _render_full(self, conv: Conversation) -> str:
        try:
            return self.render(self.template_messages(conv))
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception() lands here
            raise RowError(f"the chat template rejected it: {_template_error_text(exc)}") from None

    @property
    def _fast(self) -> bool:
        return bool(getattr(self.tokenizer, "is_fast", False))

    def encode_chat(
        self, conv: Conversation, full: str | None = None, enc=None, spans: list[tuple[int, int]] | None = None
    ) -> tuple[list[int], list[bool]]:
        """Token ids and trained flags of a chat; `full`/`enc` pass in a render and its tokenisation,
        `spans` the assistant turns' character spans in `full` where the caller already has them."""
        if full is None:
            full = self._render_full(conv)
        if enc is None:
            enc = self._ids(full, offsets=self._fast)
        ids = list(enc["input_ids"])
        if self.loss_on == "all":
            return ids, [True] * len(ids)
        offsets = enc.get("offset_mapping") if self._fast else None
        mask = [False] * len(ids)
        for start, end in self.assistant_spans(conv, full) if spans is None else spans:
            t0 = self._char_to_token(full, ids, offsets, start, is_end=False)
            t1 = self._char_to_token(full, ids, offsets, end, is_end=True)
            # Whitespace after the end-of-turn token is template glue the model never generates.
            while t1 - 1 > t0 and self._is_whitespace_token(ids[t1 - 1]) and ids[t1 - 2] in self.special_ids:
                t1 -= 1
            for t in range(t0, t1):
                mask[t] = True
        return ids, mask

    # -- plain text ---------------------------------------------------------------------------

    def encode_document(self, conv: Conversation, ids: list[int] | None = None) -> tuple[list[int], list[bool]]:
        if ids is None:
            ids = self.tokenizer(conv.document, add_special_tokens=True)["input_ids"]
        ids = list(ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # so the model learns where a document ends
        return ids, [True] * len(ids)

    # -- both -----------------------------------------------------------------------------------

    def _finish(self, conv: Conversation, ids: list[int], mask: list[bool]) -> Encoded:
        if self.max_length is not None and len(ids) > self.max_length:
            raise RowError(f"{len(ids)} tokens, longer than data.max_length = {self.max_length}")
        if not any(mask):
            raise RowError("no tokens to train on after tokenisation")
        return Encoded(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], conv.source_index)

    def encode(self, conv: Conversation) -> Encoded:
        """Encode one conversation, or raise `RowError` (too long, nothing to train on, template refused)."""
        self.check_chars(conv)
        ids, mask = self.encode_document(conv) if conv.is_document else self.encode_chat(conv)
        return self._finish(conv, ids, mask)

    def encode_many(self, convs: list[Conversation], batch_size: int = 512) -> Iterator[Encoded | RowError]:
        """`encode` for many rows, in order; the full sequences are tokenised in batches (in parallel)."""
        for first in range(0, len(convs), batch_size):
            chunk = convs[first : first + batch_size]
            texts: list[str | RowError] = []
            for conv in chunk:
                try:
                    self.check_chars(conv)
                    texts.append(conv.document if conv.document is not None else self._render_full(conv))
                except RowError as exc:
                    texts.append(exc)
            ok = [k for k, t in enumerate(texts) if isinstance(t, str)]
            docs = [k for k in ok if chunk[k].is_document]
            chats = [k for k in ok if not chunk[k].is_document]
            doc_ids: dict[int, list[int]] = {}
            chat_encodings: dict[int, dict[str, Any]] = {}
            if docs:
                batch = self.tokenizer([texts[k] for k in docs], add_special_tokens=True)["input_ids"]
                doc_ids.update(zip(docs, batch))
            if chats:
                batch = self.tokenizer(
                    [texts[k] for k in chats], add_special_tokens=False, return_offsets_mapping=self._fast
                )
                for n, k in enumerate(chats):
                    chat_encodings[k] = {key: batch[key][n] for key in batch.keys()}
            for k, conv in enumerate(chunk):
                text = texts[k]
                if isinstance(text, RowError):
                    yield text
                    continue
                try:
                    if conv.is_document:
                        ids, mask = self.encode_document(conv, doc_ids[k])
                    else:
                        ids, mask = self.encode_chat(conv, text, chat_encodings[k])
                    yield self._finish(conv, ids, mask)
                except RowError as exc:
                    yield exc


def trained_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sequence as (text, trained) runs, for showing what a row trains on."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(input_ids) + 1):
        if t == len(input_ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:t], skip_special_tokens=False)
            runs.append((text, labels[start] != IGNORE_INDEX))
            start = t
    return runs
