"""Preference data (train.task = "dpo"): format detection, normalisation per format, data check findings."""

import json

import pytest
from data_tokenizers import make_tokenizer

from sftop.engine.data.check import check_data, render_check
from sftop.engine.data.conversation import Message
from sftop.engine.data.formats import RowError
from sftop.engine.data.preference_prepare import PairEncoder, prepare_preferences
from sftop.engine.data.preferences import detect_preference_format, normalise_pair
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import Preset

U, A = "user", "assistant"


def _m(role, text):
    return {"role": role, "content": text}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("char", "chatml")


def _preset(path, **data):
    return Preset(data={"source": str(path), "max_length": 64, **data}, train={"task": "dpo"})


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "columns,expected",
    [
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected"], "preference_implicit"),
        (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"], "ultrafeedback"),
        (["source", "instruction", "models", "completions"], "ultrafeedback"),
    ],
)
def test_detects_each_preference_layout(columns, expected):
    assert detect_preference_format(columns) == expected


def test_unknown_layout_says_which_columns_are_needed():
    with pytest.raises(DataError) as exc:
        detect_preference_format(["messages"], source="x.jsonl")
    assert "messages" in str(exc.value) and "`chosen` and `rejected`" in exc.value.hint


def test_explicit_strings_become_one_user_and_one_assistant_turn():
    pair = normalise_pair({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "preference", 7)
    assert pair.prompt == (Message.text(U, "What is 2+2?"),)
    assert pair.chosen == (Message.text(A, "4"),) and pair.rejected == (Message.text(A, "5"),)
    assert pair.source_index == 7 and not pair.is_text and not pair.has_images


def test_explicit_message_lists_keep_system_and_turns():
    row = {
        "prompt": [_m("system", "Be brief."), _m(U, "Hi")],
        "chosen": [_m(A, "Hello!")],
        "rejected": [_m(A, "Go away.")],
    }
    pair = normalise_pair(row, "preference")
    assert [m.role for m in pair.prompt] == ["system", U]
    assert pair.chosen[0].text_content == "Hello!" and pair.rejected[0].text_content == "Go away."


def test_ultrafeedback_binarized_repeats_the_prompt_in_each_side():
    row = {
        "prompt": "Name a colour",
        "prompt_id": "x",
        "score_chosen": 9.0,
        "score_rejected": 3.0,
        "chosen": [_m(U, "Name a colour"), _m(A, "Blue")],
        "rejected": [_m(U, "Name a colour"), _m(A, "Seven")],
    }
    pair = normalise_pair(row, "ultrafeedback")
    assert pair.prompt == (Message.text(U, "Name a colour"),)
    assert pair.chosen == (Message.text(A, "Blue"),) and pair.rejected == (Message.text(A, "Seven"),)


def test_ultrafeedback_raw_picks_best_and_worst_rated():
    row = {
        "instruction": "Say hi",
        "completions": [
            {"response": "hi", "overall_score": 7},
            {"response": "HELLO THERE", "overall_score": 9.5},
            {"response": "no", "overall_score": 2},
        ],
    }
    pair = normalise_pair(row, "ultrafeedback")
    assert pair.chosen[0].text_content == "HELLO THERE" and pair.rejected[0].text_content == "no"
    with pytest.raises(RowError, match="same rating"):
        normalise_pair(
            {
                "instruction": "x",
                "completions": [{"response": "a", "overall_score": 1}, {"response": "b", "overall_score": 1}],
            },
            "ultrafeedback",
        )


def test_implicit_conversations_share_their_prompt():
    shared = [_m(U, "Hi"), _m(A, "Hello"), _m(U, "2+2?")]
    pair = normalise_pair({"chosen": shared + [_m(A, "4")], "rejected": shared + [_m(A, "5")]}, "preference_implicit")
    assert [m.text_content for m in pair.prompt] == ["Hi", "Hello", "2+2?"]
    assert pair.chosen[0].text_content == "4" and pair.rejected[0].text_content == "5"


def test_implicit_text_cuts_after_the_shared_assistant_marker():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello friend", "rejected": "\n\nHuman: Hi\n\nAssistant: Help?"}
    pair = normalise_pair(row, "preference_implicit")
    assert pair.text == ("\n\nHuman: Hi\n\nAssistant:", " Hello friend", " Help?")


def test_images_ride_along_for_vision_models(tok):
    row = {
        "prompt": [{"role": U, "content": [{"type": "image"}, {"type": "text", "text": "What chart?"}]}],
        "chosen": "A bar chart",
        "rejected": "A cat",
        "images": ["chart.png"],
    }
    pair = normalise_pair(row, "preference")
    assert pair.has_images and pair.images == ("chart.png",)
    with pytest.raises(RowError, match="reads text only"):
        PairEncoder(tok, 64).encode(pair)


BAD_ROWS = [
    {"prompt": "What is 1+1?", "chosen": "2", "rejected": "2"},  # 0 equal
    {"prompt": "What is 1+2?", "chosen": "", "rejected": "4"},  # 1 empty chosen
    {"prompt": "What is 1+3?", "chosen": "4", "rejected": "   "},  # 2 empty rejected
    {"prompt": "", "chosen": "4", "rejected": "5"},  # 3 missing prompt
    {
        "prompt": "What is 2+3?",
        "chosen": [_m(U, "What is 9+9?"), _m(A, "18")],
        "rejected": [_m(A, "6")],
    },  # 4 chosen answers another prompt
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},  # 5 fine
    {"prompt": "Tell me a long story", "chosen": "x" * 80, "rejected": "short"},  # 6 too long
    {"prompt": "What is 3+3?", "chosen": "6", "rejected": "7"},  # 7 fine
]


def test_data_check_reports_findings_by_row_index(tmp_path, tok):
    result = check_data(_preset(_write(tmp_path, BAD_ROWS), max_bad_fraction=1.0), tok)
    by_row = {p.index: p.reason for p in result.problems}
    assert sorted(by_row) == [0, 1, 2, 3, 4, 6]
    assert "equals `rejected`" in by_row[0]
    assert "`chosen` is empty" in by_row[1] and "`rejected` is empty" in by_row[2]
    assert "`prompt` is missing or empty" in by_row[3]
    assert "must answer the row's prompt" in by_row[4]
    assert "too long" in by_row[6] and "dropped, not truncated" in by_row[6]
    assert (result.rows_read, result.usable_rows, result.stats.too_long) == (8, 2, 1)
    assert result.format == "preference" and not result.would_stop
    text = render_check(result)
    assert "pairs     8 read, 2 usable, 6 skipped" in text
    assert "row 6: pair is too long" in text and "1 pair(s) over data.max_length dropped" in text
    json.dumps(result.to_dict())


def test_implicit_rows_with_different_prompts_are_reported(tmp_path, tok):
    rows = [
        {"chosen": [_m(U, "A?"), _m(A, "a")], "rejected": [_m(U, "B?"), _m(A, "b")]},
        {"chosen": [_m(U, "A?"), _m(A, "a")], "rejected": [_m(U, "A?"), _m(A, "b")]},
        {
            "chosen": [_m(U, "A?"), _m(A, "a"), _m(U, "C?"), _m(A, "c")],
            "rejected": [_m(U, "A?"), _m(A, "a"), _m(U, "D?"), _m(A, "d")],
        },
    ]
    result = check_data(_preset(_write(tmp_path, rows), max_bad_fraction=1.0), tok)
    assert result.format == "preference_implicit"
    assert [(p.index, p.reason) for p in result.problems] == [
        (0, "`chosen` and `rejected` share no prompt: their first messages differ"),
        (2, "chosen and rejected have different prompts: they part before an assistant turn"),
    ]


def test_length_distribution_of_each_side_and_policy(tok):
    preset = Preset(
        data={"source": "builtin:arithmetic-preferences", "max_length": 64, "eval_fraction": 0.1}, train={"task": "dpo"}
    )
    result = check_data(preset, tok)
    s = result.stats
    # ChatML over a character tokenizer: "<|im_start|>user\nWhat is 7+1?<|im_end|>\n<|im_start|>assistant\n"
    assert (
        s.prompt.p50
        == s.prompt.max
        == len(
            tok("<|im_start|>user\nWhat is 7+1?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
                "input_ids"
            ]
        )
    )
    assert 1 <= s.chosen.p50 <= s.chosen.max and 1 <= s.rejected.p50 <= s.rejected.max
    assert 0 < s.trained_share < 0.5  # the answers are scored, the prompt (counted twice) is context
    assert (result.rows_read, result.bad_rows, result.eval_rows) == (1000, 0, 100)
    prepared = prepare_preferences(preset, tok)
    assert prepared.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert (len(prepared.train), len(prepared.eval)) == (900, 100)
    row = prepared.train[0]
    assert tok.decode(row["chosen_ids"]).startswith("8") and tok.decode(row["rejected_ids"]).startswith("6")
    # the same pairs at a max_length the prompt alone fills: every pair dropped, the run would stop
    tight = preset.model_copy(update={"data": preset.data.model_copy(update={"max_length": s.prompt.max})})
    stopped = check_data(tight, tok)
    assert stopped.would_stop and stopped.stats.too_long == 1000
    with pytest.raises(DataError):
        prepare_preferences(tight, tok)


def test_sft_formats_are_refused_for_dpo(tok):
    with pytest.raises(DataError, match="preference"):
        check_data(Preset(data={"source": "builtin:arithmetic"}, train={"task": "dpo"}), tok)


def test_dropped_pairs_are_warned_with_their_count(tok):
    base = Preset(
        data={"source": "builtin:arithmetic-preferences", "eval_fraction": 0.1, "max_bad_fraction": 1.0},
        train={"task": "dpo"},
    )
    s = check_data(base, tok).stats
    limit = s.prompt.max + max(s.chosen.max, s.rejected.max) - 1  # the longest pairs no longer fit
    tight = base.model_copy(update={"data": base.data.model_copy(update={"max_length": limit})})
    dropped = check_data(tight, tok).stats.too_long
    assert 0 < dropped < 1000
    prepared = prepare_preferences(tight, tok)
    assert len(prepared.train) + len(prepared.eval) == 1000 - dropped
    assert prepared.warnings == [
        f"{dropped:,} pair(s) longer than data.max_length = {limit:,} were dropped (never truncated)"
    ]
