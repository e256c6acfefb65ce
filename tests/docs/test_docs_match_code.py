"""README's command table and docs/tui.md's key table say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        # a cell may hold an escaped pipe (`[f16\|bf16]`): split on the others
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows


def test_readme_commands_are_the_cli_subcommands():
    from sftop.cli import build_parser

    parser = build_parser()
    # argparse has no public accessor for its subcommands
    sub = next(a for a in parser._subparsers._group_actions)
    commands = set(sub.choices) - {"tui"}  # `sftop` alone is the TUI: the table's first row
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set()
    for first, _what in _table_rows(readme, "| command |"):
        documented |= set(re.findall(r"`sftop ([a-z]+)", first))
    assert documented == commands


def _doc_keys(cell: str) -> set[str]:
    keys = set()
    for group in re.findall(r"`([^`]+)`(?:/(\w+))?", cell):
        keys.update(k for k in group if k)
    return keys - {"enter"}  # enter opens the highlighted row: the table's own key, not a binding


def _bound_keys(*classes) -> set[str]:
    """Every key a screen answers, those its footer leaves out for room included."""
    keys = set()
    for cls in classes:
        for binding in cls.BINDINGS:
            keys.update(k.strip() for k in binding.key.split(","))
    return keys


@pytest.mark.parametrize("screen", ["Home", "New run (wizard)", "Run dashboard", "Runs"])
def test_tui_doc_lists_each_screens_keys(screen):
    from sftop.tui.screens.dashboard import DashboardScreen
    from sftop.tui.screens.home import HomeScreen
    from sftop.tui.screens.runs import RunsScreen
    from sftop.tui.wizard.dataset_step import DatasetStep
    from sftop.tui.wizard.model_step import ModelStep
    from sftop.tui.wizard.screen import WizardScreen

    code = {
        "Home": (HomeScreen,),
        "New run (wizard)": (WizardScreen, ModelStep, DatasetStep),
        "Run dashboard": (DashboardScreen,),
        "Runs": (RunsScreen,),
    }[screen]
    rows = {r[0]: r for r in _table_rows((ROOT / "docs" / "tui.md").read_text(encoding="utf-8"), "| Screen |")}
    assert _doc_keys(rows[screen][2]) == _bound_keys(*code)
