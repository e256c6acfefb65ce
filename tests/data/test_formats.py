import pytest

from sftop.engine.data.conversation import ImagePart, TextPart
from sftop.engine.data.formats import RowError, check_forced_format, detect_format, normalise_row
from sftop.engine.errors import DataError


def roles_texts(conv):
    return [(m.role, m.text_content) for m in conv.messages]


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["messages"], "messages"),
        (["messages", "text"], "messages"),  # a pre-rendered text copy does not win over the chat
        (["conversations", "id"], "sharegpt"),
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["text", "meta"], "text"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_unknown_names_columns_and_fix():
    with pytest.raises(DataError) as info:
        detect_format(["question", "answer"], source="qa.jsonl")
    message = str(info.value)
    assert "answer, question" in message and "qa.jsonl" in message and "data.format" in message
    assert "data.columns.prompt=question" in message  # how to map columns with other names


def test_forced_format_missing_column():
    with pytest.raises(DataError, match="no `completion` column"):
        check_forced_format("prompt_completion", ["prompt", "text"], source="x.jsonl")
    check_forced_format("text", ["messages", "text"], source="x.jsonl")  # present: no error


def test_messages_string_and_parts():
    conv = normalise_row(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hello"},
            ]
        },
        "messages",
        4,
    )
    assert conv.source_index == 4
    assert roles_texts(conv) == [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello")]
    assert conv.messages[1].content == (TextPart("Hi "), TextPart("there"))
    assert conv.to_dict()["messages"][2] == {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}
    assert conv.template_messages()[1] == {"role": "user", "content": "Hi there"}


def test_messages_image_part_is_kept_for_later():
    conv = normalise_row(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A cat"},
            ]
        },
        "messages",
    )
    assert conv.messages[0].content[0] == ImagePart("cat.png")
    assert conv.messages[0].has_image and conv.messages[0].text_content == "What?"


def test_sharegpt_roles_mapped():
    conv = normalise_row(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ]
        },
        "sharegpt",
    )
    assert roles_texts(conv) == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_sharegpt_unknown_speaker():
    with pytest.raises(RowError, match="unknown speaker 'robot'"):
        normalise_row({"conversations": [{"from": "robot", "value": "Q"}]}, "sharegpt")


def test_prompt_completion_strings_and_lists():
    conv = normalise_row({"prompt": "2+2?", "completion": "4"}, "prompt_completion")
    assert roles_texts(conv) == [("user", "2+2?"), ("assistant", "4")]
    conv = normalise_row(
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A"}],
        },
        "prompt_completion",
    )
    assert roles_texts(conv) == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_alpaca_with_and_without_input():
    conv = normalise_row({"instruction": "Reverse the word.", "input": "kato", "output": "otak"}, "alpaca")
    assert roles_texts(conv) == [("user", "Reverse the word.\n\nkato"), ("assistant", "otak")]
    conv = normalise_row({"instruction": "What is 2+2?", "input": "", "output": "4", "system": "Be brief."}, "alpaca")
    assert roles_texts(conv) == [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4")]


def test_text_becomes_document():
    conv = normalise_row({"text": "Once upon a time"}, "text", 2)
    assert conv.is_document and conv.document == "Once upon a time" and conv.messages == ()


@pytest.mark.parametrize(
    "row, fmt, reason",
    [
        ({"prompt": "Q"}, "prompt_completion", "`completion` is missing"),
        ({"instruction": "Q", "output": 5}, "alpaca", "`output` is a number, expected a string"),
        ({"messages": "hello"}, "messages", "`messages` is a string, expected a list of messages"),
        ({"messages": [{"content": "x"}]}, "messages", "messages[0] has no `role`"),
        ({"messages": [{"role": "user", "content": None}]}, "messages", "messages[0] content is missing"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages", "unsupported type 'audio'"),
        ({"text": None}, "text", "`text` is missing"),
    ],
)
def test_row_errors_say_what_is_wrong(row, fmt, reason):
    with pytest.raises(RowError) as info:
        normalise_row(row, fmt)
    assert reason in str(info.value)


def test_prompt_completion_mixed_string_and_list():
    conv = normalise_row({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}, "prompt_completion")
    assert roles_texts(conv) == [("user", "Q"), ("assistant", "A")]


def test_messages_with_speaker_aliases():
    conv = normalise_row(
        {"messages": [{"role": "Human", "content": "Q"}, {"role": "model", "content": "A"}]}, "messages"
    )
    assert roles_texts(conv) == [("user", "Q"), ("assistant", "A")]
    conv = normalise_row({"messages": [{"role": "tool", "content": "T"}]}, "messages")
    assert conv.messages[0].role == "tool"  # left for validation to report


def test_empty_system_message_is_dropped_and_sharegpt_system_column_used():
    conv = normalise_row(
        {
            "messages": [
                {"role": "system", "content": ""},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
        "messages",
    )
    assert roles_texts(conv) == [("user", "Q"), ("assistant", "A")]
    conv = normalise_row(
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "sharegpt",
    )
    assert roles_texts(conv) == [("system", "Be brief."), ("user", "Q"), ("assistant", "A")]
