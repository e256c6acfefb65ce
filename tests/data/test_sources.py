import csv
import json

import pytest

from sftop.engine.data.sources import load_rows
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import DataSection

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "What is 3+5?", "completion": "8"},
    {"prompt": "Reverse: kato", "completion": "otak"},
]


def load(source, **kw):
    return load_rows(DataSection(source=str(source), **kw))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl(tmp_path):
    raw = load(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert raw.kind == "jsonl" and list(raw) == ROWS and raw.columns == ["prompt", "completion"]


def test_jsonl_bad_line_is_one_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    raw = load(path)
    assert len(raw) == 3 and raw.rows[1] is None and raw.rows[2] == ROWS[1]
    assert raw.errors[1].startswith("line 3 is not valid JSON")


def test_json_list_and_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    assert list(load(tmp_path / "a.json")) == ROWS
    (tmp_path / "b.json").write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert list(load(tmp_path / "b.json", split="test")) == ROWS[:1]
    (tmp_path / "c.json").write_text("[1, 2")
    with pytest.raises(DataError, match="is not valid JSON"):
        load(tmp_path / "c.json")


def test_csv_and_tsv(tmp_path):
    for name, delim in (("d.csv", ","), ("d.tsv", "\t")):
        with (tmp_path / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "completion"], delimiter=delim)
            writer.writeheader()
            writer.writerows(ROWS)
        assert list(load(tmp_path / name)) == ROWS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    raw = load(tmp_path / "d.parquet")
    assert raw.kind == "parquet" and list(raw) == ROWS and raw.columns == ["prompt", "completion"]
    assert list(load(tmp_path / "d.parquet", max_rows=2)) == ROWS[:2]


def test_save_to_disk_dataset_and_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    raw = load(tmp_path / "ds")
    assert raw.kind == "saved" and list(raw) == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS), "validation": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert list(load(tmp_path / "dd", split="validation")) == ROWS[:1]
    assert list(load(tmp_path / "dd", max_rows=2)) == ROWS[:2]
    with pytest.raises(DataError, match="no split 'test'") as info:
        load(tmp_path / "dd", split="test")
    assert "train, validation" in str(info.value)


def test_folder_of_jsonl_files(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[2:])
    assert list(load(tmp_path)) == ROWS
    (tmp_path / "extra.csv").write_text("a\n1\n")
    with pytest.raises(DataError, match="files of several types"):
        load(tmp_path)


def test_missing_file_names_path_and_hint(tmp_path):
    with pytest.raises(DataError) as info:
        load(tmp_path / "nope.jsonl")
    message = str(info.value)
    assert str(tmp_path / "nope.jsonl") in message and "does not exist" in message and "builtin:arithmetic" in message
    with pytest.raises(DataError, match="does not exist"):
        load("./data/train")  # path-like, not a hub id


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="cannot read .xlsx files"):
        load(tmp_path / "d.xlsx")


def test_hub_id_offline_says_what_to_do(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load("someone/some-dataset")
    message = str(info.value)
    assert "cannot be reached" in message and "save_to_disk" in message


def test_builtin_and_max_rows():
    raw = load("builtin:arithmetic", max_rows=10)
    assert raw.kind == "builtin" and len(raw) == 10 and raw.total_rows == 1000
    with pytest.raises(DataError, match="no built-in dataset named `nope`") as info:
        load("builtin:nope")
    assert "builtin:arithmetic" in str(info.value)


def test_not_utf8(tmp_path):
    (tmp_path / "d.json").write_bytes('[{"prompt": "caf\xe9", "completion": "x"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load(tmp_path / "d.json")  # a whole-file format: the file cannot be read at all


def test_csv_with_json_message_lists(tmp_path):
    from sftop.engine.data.formats import normalise_row

    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(messages)])
    (row,) = list(load(tmp_path / "d.csv"))
    conv = normalise_row(row, "messages")
    assert [(m.role, m.text_content) for m in conv.messages] == [("user", "Q"), ("assistant", "A")]
