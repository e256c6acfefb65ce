"""Broken files read as a user would hope: the bad row is named with its line, the rest are kept."""

import json
import os

import pytest

from sftop.engine.data.sources import load_rows
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import DataSection


def load(source, **kw):
    return load_rows(DataSection(source=str(source), **kw))


def _jsonl_lines(n):
    return [json.dumps({"prompt": f"question {i} " + "x" * 20, "completion": f"answer {i}"}) + "\n" for i in range(n)]


def test_one_bad_byte_in_a_big_jsonl_file_is_one_bad_row_at_the_right_line_and_offset(tmp_path):
    # Far past the first decoder chunk (8 KiB), where a chunk-relative offset would be wrong.
    lines = _jsonl_lines(2000)
    data = "".join(lines).encode()
    bad_line = 1500
    offset = sum(len(line.encode()) for line in lines[: bad_line - 1]) + 15
    data = data[:offset] + b"\xff" + data[offset + 1 :]
    (tmp_path / "d.jsonl").write_bytes(data)
    raw = load(tmp_path / "d.jsonl")
    assert len(raw) == 2000 and raw.errors.keys() == {bad_line - 1}
    assert raw.errors[bad_line - 1] == f"line {bad_line} is not UTF-8 (byte 0xff at file offset {offset})"
    assert raw.rows[bad_line] == json.loads(lines[bad_line])


def test_one_bad_byte_in_a_csv_file_is_one_bad_row(tmp_path):
    body = "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3000))
    data = body.encode()
    offset = data.index(b"q2500,")
    data = data[: offset + 1] + b"\xe9" + data[offset + 1 :]
    (tmp_path / "d.csv").write_bytes(data)
    raw = load(tmp_path / "d.csv")
    assert len(raw) == 3000 and list(raw.errors) == [2500]
    assert raw.errors[2500] == f"line 2502 is not UTF-8 (column prompt, byte 0xe9 at file offset {offset + 1})"
    assert raw.rows[2501] == {"prompt": "q2501", "completion": "a2501"}


def test_an_unterminated_csv_quote_is_reported_where_it_opened(tmp_path):
    rows = [f"q{i},a{i}\n" for i in range(10)]
    rows[3] = 'q3,"a3 the quote never closes\n'
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(rows))
    raw = load(tmp_path / "d.csv")
    assert len(raw) == 4  # rows 0-2, then the swallowing one
    assert list(raw.errors) == [3]
    reason = raw.errors[3]
    assert "line 5 opens a quote" in reason and "runs to line 11" in reason and "swallows 6 row(s)" in reason


def test_a_real_multi_line_field_is_not_mistaken_for_an_unclosed_quote(tmp_path):
    text = 'prompt,completion\n"a poem:\nline one\nline two\nline three",ok\nq,a\n'
    (tmp_path / "d.csv").write_text(text)
    raw = load(tmp_path / "d.csv")
    assert raw.errors == {} and len(raw) == 2 and raw.rows[0]["completion"] == "ok"


def test_an_unterminated_quote_makes_data_check_fail(tmp_path):
    from sftop.engine.data.prepare import validate_structure

    rows = [f"q{i},a{i}\n" for i in range(10)]
    rows[1] = 'q1,"a1\n'
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(rows))
    with pytest.raises(DataError, match="line 3 opens a quote"):
        validate_structure(DataSection(source=str(tmp_path / "d.csv"), max_bad_fraction=0.0))


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.json", "d.parquet"])
def test_an_empty_file_holds_no_rows(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError) as info:
        load(tmp_path / name)
    assert "holds no rows (the file is empty)" in str(info.value)
    assert "Cannot tell the format" not in str(info.value)


def test_dev_null_is_not_called_missing():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null on this system")
    with pytest.raises(DataError) as info:
        load("/dev/null")
    text = str(info.value)
    assert "holds no rows" in text and "does not exist" not in text
