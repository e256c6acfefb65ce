"""The dataset step on image data: statistics, bad rows, and the sample picture beside its text."""

import io
import json

import pytest
from PIL import Image
from rich.console import Console
from tui_helpers import text_of, wait_until

from sftop.tui.app import SftopApp
from sftop.tui.widgets.image_preview import HalfBlockImage
from sftop.tui.wizard.dataset_step import DatasetStep
from sftop.tui.wizard.screen import WizardScreen

RED = (200, 10, 10)
RED_HEX = "#c80a0a"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def image_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (112, 56), RED).save(tmp_path / "img" / "red.png")
    rows = [{"prompt": "What colour is it?", "completion": "red", "images": ["img/red.png"]} for _ in range(19)]
    rows.insert(3, {"prompt": "What colour is it?", "completion": "?", "images": ["img/gone.png"]})
    path = tmp_path / "pictures.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


async def check_source(pilot, app, source):
    await wait_until(pilot, lambda: isinstance(app.screen, WizardScreen))
    await pilot.press("ctrl+n")
    data = app.screen.query_one(DatasetStep)
    field = app.screen.query_one("#data-input")
    field.value = source
    field.focus()
    await pilot.press("enter")
    await wait_until(
        pilot, lambda: data.checked_source == source and (data.result is not None or data.error), timeout=120
    )
    assert data.error is None, data.error
    return data


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_image_data_shows_stats_bad_rows_and_the_picture(services, tmp_path, size):
    source = image_dataset(tmp_path)
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=size) as pilot:
        data = await check_source(pilot, app, source)
        assert data.result.bad_rows == 1 and data.result.image_stats.images == 19
        report = text_of(app, "#data-report")
        assert "images 19 in 19 rows" in report and "per row 1:" in report
        assert "size 112x56 -> 112x56 px (0 resized)" in report
        assert "image tokens needs a vision model to count" in report
        assert "1 bad rows (5%) will be skipped." in report
        assert any(
            line.strip().startswith("3 ") and "image 1: file img/gone.png does not exist" in line
            for line in report.splitlines()
        ), report
        assert "image 1: 112x56 -> 112x56" in report and "What colour is it?" in report
        # the picture itself: half-blocks in the image's colour, beside the masked conversation
        scroll = app.screen.query_one("#data-report-scroll")
        scroll.focus()
        await pilot.press("end")  # scrolling may animate: wait for the picture to be on screen
        await wait_until(pilot, lambda: "▀" in (shot := app.export_screenshot()) and RED_HEX in shot.lower())
        row_with_picture = next(line for line in report.splitlines() if "▀" in line)
        assert row_with_picture.index("▀") < 4  # left column: the text sits to its right
        assert any(
            "▀" in line and ("user" in line or "What colour" in line or "assistant" in line)
            for line in report.splitlines()
        ), report


async def test_builtin_shapes_in_the_dataset_step(services):
    app = SftopApp(start="wizard", services=services)
    async with app.run_test(size=(80, 24)) as pilot:
        data = await check_source(pilot, app, "builtin:shapes")
        result = data.result
        assert result.rows_read == 3000
        # the demo's character-level model keeps data.max_length at 64: the longest questions do not fit
        assert set(result.problem_kinds) <= {"N tokens, longer than data.max_length = N"}
        stats = result.image_stats
        assert stats.images_per_row.keys() == {1, 2} and stats.rows_with_images == result.usable_rows
        report = text_of(app, "#data-report")
        assert f"images {stats.images:,} in {stats.rows_with_images:,} rows" in report
        assert data.result.sample_images and "image 1: 56x112 -> 56x112" in report


def test_half_blocks_carry_both_pixel_rows():
    image = Image.new("RGB", (4, 4), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 2))  # top half red, bottom half blue
    console = Console(width=20, file=io.StringIO(), color_system="truecolor", record=True)
    block = HalfBlockImage(image, max_width=4, max_height=2)
    assert block.cells() == (4, 2)
    lines = list(console.render_lines(block, console.options, pad=False))
    assert len(lines) == 2 and all(len(line) == 4 for line in lines)
    top, bottom = lines[0][0], lines[1][0]
    assert top.text == "▀" and top.style.color.triplet == (255, 0, 0) and top.style.bgcolor.triplet == (255, 0, 0)
    assert bottom.style.color.triplet == (0, 0, 255) and bottom.style.bgcolor.triplet == (0, 0, 255)
    wide = HalfBlockImage(Image.new("RGB", (200, 50)), max_width=24, max_height=12)
    assert wide.cells() == (24, 3) and wide.cells(max_width=10) == (10, 1)
