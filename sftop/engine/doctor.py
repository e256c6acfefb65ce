"""`sftop doctor`: can this machine train, and if not, what to do about it.

Each check is a line with a status (ok / warn / fail), what was found, and a hint when it is not ok.
Nothing here may raise: a broken driver or a missing package is a finding, not a traceback.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field

from sftop.engine.paths import state_dir

MIN_FREE_DISK_GIB = 10.0


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    found: str
    hint: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, status: str, found: str, hint: str = "") -> None:
        self.checks.append(Check(name, status, found, hint))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def _version(module: str) -> str | None:
    # Installed metadata, not an import: importing trl/peft/bitsandbytes costs many seconds and
    # doctor must answer quickly on a slow disk.
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_python(report: DoctorReport) -> None:
    ok = sys.version_info >= (3, 10)
    report.add(
        "python",
        "ok" if ok else "fail",
        f"Python {platform.python_version()} ({sys.executable})",
        "" if ok else "sftop needs Python 3.10 or newer",
    )


def _check_packages(report: DoctorReport) -> None:
    for module, needed in (
        ("transformers", True),
        ("trl", True),
        ("peft", True),
        ("datasets", True),
        ("accelerate", True),
        ("textual", True),
        ("bitsandbytes", False),
        ("triton", False),
    ):
        version = _version(module)
        if version:
            report.add(module, "ok", version)
        else:
            report.add(
                module,
                "fail" if needed else "warn",
                "not importable",
                f"pip install {module}" + ("" if needed else " (needed for 4-bit / fused kernels on a GPU)"),
            )


def _check_tested_versions(report: DoctorReport) -> None:
    from sftop.engine.tested_versions import constraints_path, version_drift

    drift = version_drift()
    if not drift:
        report.add("versions", "ok", "the packages sftop depends on are the tested versions")
        return
    names = " ".join(d.package for d in drift)
    report.add(
        "versions",
        "warn",
        "not the tested versions: " + ", ".join(str(d) for d in drift),
        f"if something fails, install the tested ones: pip install -c {constraints_path()} {names}",
    )


def _check_torch(report: DoctorReport) -> None:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report any import failure
        report.add("torch", "fail", f"not importable ({exc})", "pip install torch (see pytorch.org for your CUDA)")
        return
    cuda = torch.version.cuda
    report.add("torch", "ok", f"{torch.__version__}" + (f", built for CUDA {cuda}" if cuda else ", CPU-only build"))
    try:
        available = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        available = False
        report.add("cuda", "warn", f"CUDA check failed: {exc}", "check the NVIDIA driver with nvidia-smi")
        return
    if available:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = torch.cuda.is_bf16_supported()
        report.add("cuda", "ok", f"{len(names)} device(s): {', '.join(names)}; bf16 {'yes' if bf16 else 'no (fp16)'}")
    elif cuda:
        report.add(
            "cuda",
            "warn",
            "torch has CUDA but sees no GPU",
            "check nvidia-smi and CUDA_VISIBLE_DEVICES; sftop will train on the CPU (demo only)",
        )
    else:
        report.add(
            "cuda",
            "warn",
            "no CUDA in this torch build",
            "install a CUDA build of torch to train on a GPU; the demo runs on the CPU",
        )


def _check_gpus(report: DoctorReport) -> None:
    from sftop.engine.gpu import read_gpus

    status = read_gpus()
    if not status.gpus:
        report.add("gpus", "warn", "no GPU visible through NVML", status.reason or "")
        return
    for gpu in status.gpus:
        gib = 1024**3
        free = (
            (gpu.memory_total - gpu.memory_used) / gib
            if gpu.memory_total is not None and gpu.memory_used is not None
            else None
        )
        total = gpu.memory_total / gib if gpu.memory_total is not None else None
        found = f"[{gpu.index}] {gpu.name}: " + (
            f"{free:.1f} GiB free of {total:.1f} GiB" if free is not None else "memory N/A"
        )
        report.add(
            "gpu",
            "ok" if free is None or free > 2 else "warn",
            found,
            ""
            if free is None or free > 2
            else "another process holds most of this GPU's memory (nvidia-smi shows which)",
        )


def _check_disk(report: DoctorReport) -> None:
    where = state_dir()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free = usage.free / 1024**3
    ok = free >= MIN_FREE_DISK_GIB
    report.add(
        "disk",
        "ok" if ok else "warn",
        f"{free:.1f} GiB free at {where}",
        ""
        if ok
        else f"checkpoints and merged exports need space: free at least {MIN_FREE_DISK_GIB:.0f} GiB, or set SFTOP_HOME to a bigger disk",
    )


def _check_terminal(report: DoctorReport) -> None:
    term = os.environ.get("TERM", "")
    colorterm = os.environ.get("COLORTERM", "")
    if "NO_COLOR" in os.environ:
        colours = "none (NO_COLOR is set)"
    elif colorterm in ("truecolor", "24bit"):
        colours = "truecolor"
    elif "256color" in term:
        colours = "256"
    elif term in ("", "dumb"):
        colours = "none"
    else:
        colours = "16"
    ok = colours in ("truecolor", "256")
    size = shutil.get_terminal_size((0, 0))
    report.add(
        "terminal",
        "ok" if ok else "warn",
        f"TERM={term or '(unset)'}, colours: {colours}, size {size.columns}x{size.lines}",
        ""
        if ok
        else "for the TUI's charts use a 256-colour terminal: export TERM=xterm-256color (tmux: set -g default-terminal tmux-256color)",
    )


def diagnose() -> DoctorReport:
    report = DoctorReport()
    for check in (
        _check_python,
        _check_packages,
        _check_tested_versions,
        _check_torch,
        _check_gpus,
        _check_disk,
        _check_terminal,
    ):
        try:
            check(report)
        except Exception as exc:  # noqa: BLE001 - a doctor must always finish its report
            report.add(check.__name__.removeprefix("_check_"), "warn", f"check failed: {exc!r}")
    return report


def render_report(report: DoctorReport, color: bool = False) -> str:
    marks = {"ok": ("ok  ", "32"), "warn": ("warn", "33"), "fail": ("FAIL", "31")}
    lines = []
    for c in report.checks:
        mark, code = marks.get(c.status, (c.status, "0"))
        if color:
            mark = f"\x1b[{code}m{mark}\x1b[0m"
        lines.append(f"{mark}  {c.name:<12} {c.found}")
        if c.hint:
            lines.append(f"      {'':<12} hint: {c.hint}")
    lines.append("")
    lines.append("sftop can train here." if report.ok else "sftop cannot train here yet: fix the FAIL lines above.")
    return "\n".join(lines)
