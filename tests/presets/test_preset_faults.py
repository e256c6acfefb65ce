"""Preset files that are not UTF-8, and validation messages that must read as the user wrote them."""

from __future__ import annotations

import pytest

from sftop.cli import main
from sftop.engine.errors import PresetError
from sftop.engine.paths import user_presets_dir
from sftop.engine.presets import list_presets, load_preset


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOP_HOME", str(tmp_path / "home"))


LATIN1 = 'name = "caf\xe9"\ndescription = "d\xe9j\xe0 vu"\n'.encode("latin-1")


def test_a_non_utf8_preset_file_is_one_paragraph_with_its_line_and_offset(tmp_path, capsys):
    path = tmp_path / "latin.toml"
    path.write_bytes(b"# fine\n" + LATIN1)
    with pytest.raises(PresetError) as info:
        load_preset(str(path))
    text = str(info.value)
    assert "is not UTF-8 text" in text and "0xe9" in text and "offset 18" in text and "line 2" in text
    assert "iconv" in text
    assert main(["presets", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftop: error:") and "Traceback" not in err


def test_a_non_utf8_file_in_the_presets_directory_breaks_nothing_else(tmp_path, capsys):
    folder = user_presets_dir()
    folder.mkdir(parents=True)
    (folder / "broken.toml").write_bytes(LATIN1)
    names = {p.name: p for p in list_presets()}
    assert names["broken"].description == "(unreadable)" and "demo" in names
    assert main(["presets", "list"]) == 0
    assert "broken" in capsys.readouterr().out
    preset, _ = load_preset("demo")  # other presets still resolve by name
    assert preset.name == "demo"


def test_a_bad_name_is_explained_without_a_lower_cased_pattern(tmp_path):
    with pytest.raises(PresetError) as info:
        load_preset("demo", ["name=my run"])
    text = str(info.value)
    assert "may hold only letters, digits" in text
    assert "a-za-z" not in text and "pattern" not in text
