"""benchmarks/vlm_whole_run.py's CPU smoke mode: every path trains the same rows at the same rows
per optimizer step and the report says so."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "benchmarks"


@pytest.mark.slow
def test_vlm_whole_run_smoke(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "vlm_whole_run.py"),
            "--out",
            str(tmp_path),
            "--shape",
            "qwen2.5-vl-tiny",
            "--rows",
            "4",
            "--effective-batch",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "vlm_whole_run.json").read_text())
    data = report["data"]
    assert data["rows"] == 4 and 4 <= data["images"] <= 16 and data["image_tokens"] < data["tokens"]
    for name in ("trl", "sftop", "sftop:no-packing"):
        assert report[name]["steps"] == 2 and report[name]["rows_per_step"] == 2.0, name
        assert report[name]["useful_tokens_per_s"] > 0
    # TRL's collator saw exactly the tokens sftop's data check counted: the same rows, no padding counted
    assert report["trl"]["collated_tokens"] == data["tokens"]
    assert report["sftop"]["tokens_seen"] == report["sftop:no-packing"]["tokens_seen"] == data["tokens"]
    assert report["sftop"]["packing"] is True and report["sftop:no-packing"]["packing"] is False
    # packed or padded, sftop trains the same numbers
    assert report["sftop"]["final_loss"] == pytest.approx(report["sftop:no-packing"]["final_loss"], rel=1e-5)
    table = (tmp_path / "vlm_whole_run.md").read_text()
    assert "| sftop | " in table and "packed" in table and "Packing alone" in table
