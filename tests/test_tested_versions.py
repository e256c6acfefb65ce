"""One list of tested versions: constraints.txt at the top, shipped in the package, matched by the
ranges in pyproject.toml, and checked by `sftop doctor`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from sftop.engine import doctor, tested_versions
from sftop.engine.tested_versions import DIRECT, normalize, parse_pins, version_drift

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_ships_the_top_level_constraints():
    top = (ROOT / "constraints.txt").read_text()
    assert tested_versions.constraints_path().read_text() == top
    pins = parse_pins(top)
    assert pins["transformers"] == "5.17.0" and pins["huggingface-hub"] == "1.33.0"
    assert "torch" in pins  # the README's commands pin torch too, so they never resolve it twice
    # tests/constraints.txt is no second list: it only includes the top-level one
    lines = [
        ln
        for ln in (ROOT / "tests" / "constraints.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines == ["-c ../constraints.txt"]


def test_pyproject_ranges_hold_the_tested_versions_and_stop_before_untested_lines():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = parse_pins((ROOT / "constraints.txt").read_text())
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in reqs:
        name = normalize(req.name)
        if name == "tomli":
            continue  # only on Python 3.10, which the pinned set (3.11) does not install
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name]), f"{name}: {req.specifier} excludes the tested {pins[name]}"
        assert any(s.operator == "<" for s in req.specifier), f"{name} has no upper bound"
    # the releases that broke the first-hour install are outside the ranges
    by_name = {normalize(r.name): r.specifier for r in reqs}
    assert not by_name["datasets"].contains("5.2.0")
    assert not by_name["huggingface-hub"].contains("2.4.0")
    for name in DIRECT:
        assert name in by_name, f"{name} is checked by doctor but is not a declared dependency"


def test_drift_is_found_for_direct_dependencies_only():
    pins = {"transformers": "5.17.0", "torch": "2.13.0", "aiohttp": "3.14.5", "datasets": "4.8.5"}
    installed = {"transformers": "5.25.0", "torch": "2.13.0+cpu", "aiohttp": "9.9.9", "datasets": "4.8.5"}
    drift = version_drift(installed.get, pins)
    assert [str(d) for d in drift] == ["transformers 5.25.0 (tested: 5.17.0)"]
    assert drift[0].newer


def test_doctor_warns_when_installed_versions_are_not_the_tested_ones(monkeypatch):
    report = doctor.DoctorReport()
    doctor._check_tested_versions(report)
    assert [c.status for c in report.checks] == ["ok"]  # this environment is the tested set

    real = tested_versions._installed
    monkeypatch.setattr(tested_versions, "_installed", lambda name: "5.2.0" if name == "datasets" else real(name))
    report = doctor.DoctorReport()
    doctor._check_tested_versions(report)
    check = report.checks[0]
    assert check.status == "warn"
    assert "datasets 5.2.0 (tested: 4.8.5)" in check.found
    assert "tested_versions.txt datasets" in check.hint and check.hint.count("pip install -c") == 1
