"""data.columns: datasets whose columns have other names are read by mapping them."""

import json

import pytest
from data_tokenizers import make_tokenizer

from sftop.engine.data.check import check_data
from sftop.engine.errors import DataError, PresetError
from sftop.engine.presets import load_preset, to_toml


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("char", "chatml")


def _qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1), "id": i} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_answer_columns_are_read_as_prompt_and_completion(tmp_path, tok):
    path = _qa_file(tmp_path)
    preset, _ = load_preset(
        "demo",
        [f"data.source={json.dumps(str(path))}", "data.columns.prompt=question", "data.columns.completion=answer"],
    )
    assert preset.data.columns == {"prompt": "question", "completion": "answer"}
    assert "[data.columns]" in to_toml(preset)  # a run's preset.toml repeats the mapping
    result = check_data(preset, tok)
    assert result.format == "prompt_completion" and result.usable_rows == 12 and result.bad_rows == 0
    text = "".join(t for t, _ in result.sample_spans)
    assert "What is 0+1?" in text and "1" in text


def test_the_format_error_says_how_to_map_columns(tmp_path, tok):
    preset, _ = load_preset("demo", [f"data.source={json.dumps(str(_qa_file(tmp_path)))}"])
    with pytest.raises(DataError) as info:
        check_data(preset, tok)
    message = str(info.value)
    assert "question" in message and "data.columns.prompt=question" in message


def test_a_mapping_to_a_missing_column_or_an_unknown_name_is_refused(tmp_path, tok):
    source = f"data.source={json.dumps(str(_qa_file(tmp_path)))}"
    preset, _ = load_preset("demo", [source, "data.columns.prompt=query", "data.columns.completion=answer"])
    with pytest.raises(DataError) as info:
        check_data(preset, tok)
    assert "data.columns.prompt" in str(info.value) and "`query`" in str(info.value)
    with pytest.raises(PresetError) as info:
        load_preset("demo", [source, "data.columns.question=prompt"])
    assert "unknown column name 'question'" in str(info.value)
