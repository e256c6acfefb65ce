"""The package's areas keep their import boundaries (DEVELOPERS.md: engine never needs Textual)."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_engine_imports_without_textual():
    code = (
        "import importlib, pkgutil, sftop.engine as e\n"
        "for m in pkgutil.walk_packages(e.__path__, 'sftop.engine.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    mods = _modules_after(code)
    assert "sftop.engine.presets" in mods
    assert not any(m == "textual" or m.startswith("textual.") for m in mods)
    assert not any(m.startswith("sftop.tui") for m in mods)


def test_kernels_import_neither_engine_nor_tui():
    mods = _modules_after("import sftop.kernels")
    assert not any(m.startswith(("sftop.engine", "sftop.tui")) for m in mods)


def test_cli_help_is_light():
    mods = _modules_after("import sftop.cli")
    assert "torch" not in mods and "textual" not in mods


def test_planning_imports_neither_torch_nor_triton(tmp_path):
    # `sftop plan` runs before anything is installed on a GPU, and on laptops: it reads configs only
    # (`--data`, which tokenises the rows through transformers, is the one opt-in exception).
    code = (
        "import os, sys\n"
        f"os.environ.update(SFTOP_HOME={str(tmp_path)!r}, HF_HOME={str(tmp_path)!r}, HF_HUB_OFFLINE='1')\n"
        "import sftop.engine.planner\n"
        "from sftop.cli import main\n"
        "assert main(['plan', 'demo', '--gpu-memory', '24', '--json']) == 0\n"
        "assert main(['plan', 'llama-3.1-8b-qlora-24gb', '--gpu-memory', '24']) == 0\n"
    )
    mods = _modules_after(code)
    assert "sftop.engine.planner.solve" in mods and "sftop.kernels.constants" in mods
    assert not {"torch", "triton", "transformers"} & mods
