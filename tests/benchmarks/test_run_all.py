"""benchmarks/: every script explains itself with --help, and docs/benchmarks.md shows what the
raw results it cites say (run_all.py's table, built from them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402

# the scripts (cuda_timing.py and vlm_shapes.py are modules the scripts import)
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if '__name__ == "__main__"' in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, cwd=BENCH, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


def test_docs_tables_are_the_raw_results():
    doc = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    results = BENCH / "results"
    for folder in ("2026-12-03_h200_step", "2026-12-02_h200_whole"):
        table = run_all.summarise(results / folder)
        rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) >= 3
        for row in rows:
            assert row in doc, f"docs/benchmarks.md does not show {row!r} from {folder}"
    for folder, count in (("2026-11-23_h100_planner", "47 of 77"), ("2026-12-02_h200_planner", "39 of 40")):
        assert f"planner: {count} measured peaks" in run_all.summarise(results / folder)
        assert f"{folder}/planner/` | {count} |" in doc


def test_every_raw_result_backs_a_published_number():
    doc = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for path in (BENCH / "results").rglob("*"):
        if path.is_file():
            folder = path.relative_to(BENCH / "results").parts[0]
            assert f"benchmarks/results/{folder}/" in doc, f"{path} is cited nowhere in docs/benchmarks.md"


def test_summary_of_an_empty_folder_says_so(tmp_path):
    assert run_all.summarise(tmp_path) == f"no results in {tmp_path}\n"
