"""A huge row is rejected by its length in characters before any tokenising."""

import time

from sftop.engine.data.conversation import Conversation, Message
from sftop.engine.data.formats import RowError
from sftop.engine.data.tokenize import Encoder


def _counting(tokenizer):
    seen = []
    original = type(tokenizer).__call__

    def call(self, text, *args, **kwargs):
        seen.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return original(self, text, *args, **kwargs)

    return seen, call


def test_a_huge_row_is_rejected_without_tokenising_it(any_tokenizer, monkeypatch):
    seen, call = _counting(any_tokenizer)
    monkeypatch.setattr(type(any_tokenizer), "__call__", call)
    encoder = Encoder(any_tokenizer, max_length=64)
    huge = Conversation(
        messages=(Message.text("user", "Q"), Message.text("assistant", "word " * 2_000_000)), source_index=7
    )
    small = Conversation(messages=(Message.text("user", "Q"), Message.text("assistant", "A")), source_index=8)
    start = time.perf_counter()
    results = list(encoder.encode_many([huge, small]))
    assert time.perf_counter() - start < 5
    assert isinstance(results[0], RowError)
    assert "10,000,001 characters" in str(results[0]) and "data.max_length = 64" in str(results[0])
    assert not isinstance(results[1], RowError)
    assert max(seen) < 1000  # only the small row reached the tokenizer


def test_the_pre_check_never_rejects_a_row_that_fits(any_tokenizer):
    encoder = Encoder(any_tokenizer, max_length=4096)
    text = "abc " * 500
    conv = Conversation(document=text, source_index=0)
    assert len(encoder.encode(conv).input_ids) <= 4096
