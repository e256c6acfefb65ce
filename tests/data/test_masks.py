"""Loss masks checked token by token: the trained tokens decode to exactly the assistant turns."""

import pytest
from data_tokenizers import CHATML, END_OF_TURN, SPECIALS, make_tokenizer
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from sftop.engine.data.conversation import Conversation, Message
from sftop.engine.data.formats import RowError
from sftop.engine.data.tokenize import IGNORE_INDEX, Encoder, trained_spans
from sftop.engine.errors import DataError


def conv(*turns, system=None):
    msgs = [Message.text("system", system)] if system else []
    roles = ["user", "assistant"]
    msgs += [Message.text(roles[i % 2], t) for i, t in enumerate(turns)]
    return Conversation(messages=tuple(msgs))


def runs(tok, encoded):
    return trained_spans(tok, encoded.input_ids, encoded.labels)


@pytest.mark.parametrize(
    "c",
    [
        conv("What is 7+5?", "12"),
        conv("What is 7+5?", "12", "And 2+2?", "4"),
        conv("Reverse: kato", "otak", system="Answer with the result only."),
        conv(
            "Hello there, how are you today?",
            "The quick brown fox jumps over the lazy dog.",
            "Again",
            "first\n\nsecond",
        ),
    ],
    ids=["single", "two-turns", "system", "long"],
)
def test_assistant_mask_is_exactly_the_assistant_turns(any_tokenizer, c):
    tok = any_tokenizer
    eot = END_OF_TURN[tok.test_template]
    encoded = Encoder(tok).encode(c)
    assert len(encoded.input_ids) == len(encoded.labels)
    # Every label is either -100 or the token at that position: no shifting, no other values.
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(encoded.input_ids, encoded.labels))
    trained = [text for text, is_trained in runs(tok, encoded) if is_trained]
    expected = [m.text_content + eot for m in c.messages if m.role == "assistant"]
    assert trained == expected
    # The end-of-turn token is among the trained ids, once per assistant turn.
    eot_id = tok.convert_tokens_to_ids(eot)
    trained_ids = [lab for lab in encoded.labels if lab != IGNORE_INDEX]
    assert trained_ids.count(eot_id) == len(expected)
    # And the untrained part holds all prompts.
    context = "".join(text for text, is_trained in runs(tok, encoded) if not is_trained)
    for m in c.messages:
        if m.role != "assistant":
            assert m.text_content in context


def test_input_ids_equal_the_rendered_template(any_tokenizer):
    tok = any_tokenizer
    c = conv("What is 7+5?", "12")
    encoded = Encoder(tok).encode(c)
    rendered = tok.apply_chat_template(c.template_messages(), tokenize=False)
    assert encoded.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_chatml_newline_after_end_token_not_trained(chatml_tokenizer):
    tok = chatml_tokenizer
    encoded = Encoder(tok).encode(conv("Q", "A"))
    assert tok.decode(encoded.input_ids[-2:]) == "<|im_end|>\n"
    assert encoded.labels[-1] == IGNORE_INDEX and encoded.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_loss_on_all_trains_every_token(any_tokenizer):
    encoded = Encoder(any_tokenizer, loss_on="all").encode(conv("What is 7+5?", "12", "And?", "4"))
    assert encoded.labels == encoded.input_ids


def test_document_trained_in_full_with_eos(any_tokenizer):
    tok = any_tokenizer
    encoded = Encoder(tok).encode(Conversation(document="Q: What is 3+4?\nA: 7"))
    assert encoded.labels == encoded.input_ids
    assert encoded.input_ids[-1] == tok.eos_token_id
    assert tok.decode(encoded.input_ids[:-1]) == "Q: What is 3+4?\nA: 7"


def test_token_crossing_turn_boundary_is_trained():
    # A BPE with a merge of "\n1": in "assistant\n12" the token "\n1" straddles the point where the
    # assistant's answer begins. The prefix check fails, offsets decide, and the straddling
    # token counts as trained (the answer's first digit must be learned).
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + ["\n1"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "1")]))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
    )
    encoded = Encoder(tok).encode(conv("Q", "12"))
    pieces = [tok.decode([i]) for i in encoded.input_ids]
    assert "\n1" in pieces  # the merge really happened
    assert [t for t, trained in runs(tok, encoded) if trained] == ["\n12<|im_end|>"]


def test_template_not_prefix_stable_is_a_row_error():
    # Renders earlier assistant turns without their content (like templates that drop reasoning):
    # the turn cannot be located in the full conversation, so the row is reported, not guessed at.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer("char", "chatml")
    tok.chat_template = template
    Encoder(tok).encode(conv("Q", "A"))  # one turn: fine
    with pytest.raises(RowError, match="renders message 1 differently"):
        Encoder(tok).encode(conv("Q", "A", "Q2", "B"))
    # With loss on every token, the masks are not needed and the row is fine.
    Encoder(tok, loss_on="all").encode(conv("Q", "A", "Q2", "B"))


def test_template_exception_is_a_row_error():
    tok = make_tokenizer("char", "chatml")
    tok.chat_template = "{% if messages|length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}" + CHATML
    with pytest.raises(RowError, match="the chat template rejected it: only one exchange"):
        Encoder(tok).encode(conv("Q", "A", "Q2", "B"))


def test_too_long_and_untrainable_rows():
    tok = make_tokenizer("char", "chatml")
    with pytest.raises(RowError, match=r"^\d+ tokens, longer than data.max_length = 20$"):
        Encoder(tok, max_length=20).encode(conv("What is 7+5?", "12"))


def test_missing_chat_template_is_a_data_error():
    tok = make_tokenizer("char", "chatml")
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template") as info:
        Encoder(tok).require_chat_template()
    assert 'data.format = "text"' in str(info.value)


def test_template_that_decorates_only_the_last_turn():
    # Like Qwen3: the last assistant turn gets an (empty) think block, earlier ones do not. The
    # render up to an earlier turn is then not a prefix of the full render; the turn is located
    # from where the generation prompt ends to the end of its content and closing token.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer("char", "chatml")
    tok.chat_template = template
    encoded = Encoder(tok).encode(conv("What is 1+1?", "2", "And 2+2?", "4"))
    assert [t for t, trained in runs(tok, encoded) if trained] == ["2<|im_end|>", "<think></think>4<|im_end|>"]


# Real chat templates, as TRL ships them (trl/chat_templates/*.jinja), without generation markers.
# Expected trained text per assistant turn, checked by hand against each template's rendering.
TWO_TURNS = conv("What is 7+5?", "12", "And 2+2?", "4", system="Be brief.")
REAL_TEMPLATES = [
    ("llama3_1", ["12<|eot_id|>", "4<|eot_id|>"]),
    ("llama3_2", ["12<|eot_id|>", "4<|eot_id|>"]),
    ("qwen2_5", ["12<|im_end|>", "4<|im_end|>"]),
    # Qwen3 shows the empty think block on the last turn only; the generation prompt ends before it.
    ("qwen3", ["12<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"]),
    # The generation prompt opens a think block that past turns do not have: the turn starts where they part.
    ("nemotron_3_nano", ["</think>12<|im_end|>", "</think>4<|im_end|>"]),
    ("deepseekv3", ["12<｜end▁of▁sentence｜>", "4<｜end▁of▁sentence｜>"]),
    ("gemma3", ["12<end_of_turn>", "4<end_of_turn>"]),
    # Phi-3 appends end-of-text after the whole conversation: part of the last turn only.
    ("phi3", ["12<|end|>", "4<|end|>\n<|im_end|>"]),
]


@pytest.mark.parametrize("name, expected", REAL_TEMPLATES, ids=[n for n, _ in REAL_TEMPLATES])
def test_real_chat_templates(name, expected):
    import re
    from pathlib import Path

    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"this TRL version ships no {name}.jinja")
    template = path.read_text()
    tok = make_tokenizer("char", "chatml")
    specials = re.findall(r"<[|｜][^<>\s]{0,40}?[|｜]>|<start_of_turn>|<end_of_turn>|<think>|</think>", template)
    tok.add_special_tokens({"additional_special_tokens": sorted(set(specials))})
    tok.chat_template = template
    encoded = Encoder(tok).encode(TWO_TURNS)
    assert [t for t, trained in runs(tok, encoded) if trained] == expected
    # Nothing from the user or system messages is trained.
    assert all("Be brief" not in t and "2+2" not in t for t, trained in runs(tok, encoded) if trained)


def test_encode_many_equals_one_by_one(any_tokenizer):
    tok = any_tokenizer
    rows = [
        conv("What is 7+5?", "12"),
        Conversation(document="Q: What is 3+4?\nA: 7"),
        conv("x" * 80, "y"),
        conv("Again", "first\n\nsecond", "Hi", "there"),
    ] * 3
    encoder = Encoder(tok, max_length=60)
    many = list(encoder.encode_many(rows, batch_size=5))
    assert len(many) == len(rows)
    for row, got in zip(rows, many):
        try:
            want = encoder.encode(row)
        except RowError as exc:
            assert isinstance(got, RowError) and str(got) == str(exc)
        else:
            assert (got.input_ids, got.labels) == (want.input_ids, want.labels)
    assert all(isinstance(g, RowError) for g in many[2::4])  # the long rows
    assert not any(isinstance(g, RowError) for g in many[0::4] + many[1::4])
