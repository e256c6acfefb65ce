import json

import pytest
from data_tokenizers import make_tokenizer

from sftop.engine.data import prepare_data, validate_structure
from sftop.engine.data.sources import RawRows
from sftop.engine.data.validate import validate_rows
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import Preset


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = chat(("user", "What is 2+2?"), ("assistant", "4"))
BAD_ROWS = {
    1: ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message to train on"),
    3: (chat(("user", "Q"), ("assistant", "   ")), "message 1 (assistant) has empty content"),
    4: (chat(("assistant", "A"), ("user", "Q")), "bad role order: message 0 is assistant first"),
    6: (chat(("user", "Q"), ("user", "Q again"), ("assistant", "A")), "bad role order: message 1 is user after user"),
    7: (
        chat(("system", "S"), ("user", "Q"), ("system", "S2"), ("assistant", "A")),
        "bad role order: message 2 is system",
    ),
    8: (
        {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": 3}]},
        "messages[1] content is a number, expected a string or a list of parts",
    ),
    9: ({"mesages": []}, "`messages` is missing"),
    10: (chat(("user", "Q"), ("tool", "T"), ("assistant", "A")), "message 1 has unknown role 'tool'"),
    11: (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "x.png"}]},
                {"role": "assistant", "content": "A"},
            ]
        },
        "message 0 holds an image",
    ),
}


def rows_with_bad(n=20):
    rows = [GOOD] * n
    for i, (row, _) in BAD_ROWS.items():
        rows[i] = row
    return rows


def test_bad_rows_reported_with_index_and_reason():
    raw = RawRows(source="x.jsonl", kind="jsonl", rows=rows_with_bad())
    good, report = validate_rows(raw, "messages", "assistant")
    assert len(good) == 20 - len(BAD_ROWS)
    assert [p.index for p in report.problems] == sorted(BAD_ROWS)
    for problem in report.problems:
        assert problem.reason.startswith(BAD_ROWS[problem.index][1]), problem
    assert report.bad_rows == len(BAD_ROWS) and report.bad_fraction == pytest.approx(len(BAD_ROWS) / 20)
    assert [c.source_index for c in good][:3] == [0, 2, 5]


def test_no_assistant_is_fine_when_training_on_everything():
    raw = RawRows(source="x", kind="jsonl", rows=[BAD_ROWS[1][0]])
    assert validate_rows(raw, "messages", "all")[1].bad_rows == 0


def write(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_over_threshold_stops_with_first_rows_and_fix(tmp_path):
    path = write(tmp_path, rows_with_bad())
    preset = Preset(data={"source": str(path), "max_bad_fraction": 0.2})
    with pytest.raises(DataError) as info:
        validate_structure(preset.data)
    message = str(info.value)
    assert f"{len(BAD_ROWS)} of 20 rows" in message and "45.0%" in message
    assert "row 1: no assistant message to train on" in message and "row 3:" in message
    assert "row 8" not in message and "and 4 more row(s)" in message  # first five only
    assert "data.max_bad_fraction" in message and "sftop data check" in message and str(path) in message
    # Raising the threshold lets the run go on, skipping the bad rows.
    ok = validate_structure(Preset(data={"source": str(path), "max_bad_fraction": 0.5}).data)
    assert len(ok.conversations) == 20 - len(BAD_ROWS) and ok.report.bad_rows == len(BAD_ROWS)


def test_length_pass_counts_towards_threshold(tmp_path):
    rows = [GOOD] * 18 + [chat(("user", "x" * 200), ("assistant", "y"))] * 2
    path = write(tmp_path, rows)
    tok = make_tokenizer("char", "chatml")
    with pytest.raises(DataError) as info:
        prepare_data(Preset(data={"source": str(path), "max_length": 64}), tok)
    assert "row 18: 222 tokens, longer than data.max_length = 64" in str(info.value)
    assert "raise data.max_length (the longest has 222 tokens)" in str(info.value)
    prepared = prepare_data(Preset(data={"source": str(path), "max_length": 64, "max_bad_fraction": 0.1}), tok)
    assert len(prepared.train) == 18 and [p.index for p in prepared.report.problems] == [18, 19]
    assert max(len(ids) for ids in prepared.train["input_ids"]) <= 64  # skipped, not truncated


def test_all_rows_bad_even_with_full_tolerance(tmp_path):
    path = write(tmp_path, [BAD_ROWS[1][0]] * 3)
    with pytest.raises(DataError, match="None of the 3 rows"):
        validate_structure(Preset(data={"source": str(path), "max_bad_fraction": 1.0}).data)


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError):
        validate_structure(Preset(data={"source": str(path), "format": "messages"}).data)
