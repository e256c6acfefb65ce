"""The GPUs: name, memory used/total bar, utilisation; or, when there are none, why."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from sftop.tui.widgets.memory_bar import usage_bar


class GpuPanel(Static):
    DEFAULT_CSS = """
    GpuPanel { height: auto; }
    """

    def __init__(self, *, compact: bool = False, id: str | None = None, classes: str | None = None):
        super().__init__("reading GPUs…", id=id, classes=classes)
        self.compact = compact

    def show(self, status: Any, only_uuid: str | None = None) -> None:
        """`status` is a `sftop.engine.gpu.GpuStatus`, or an exception/str explaining why there is none.

        `only_uuid` limits the panel to the GPUs a run was pinned to (one UUID, or several
        comma-separated for a multi-GPU run), when they are visible.
        """
        if status is None or isinstance(status, (str, Exception)):
            reason = str(status) if status else "GPU info unavailable"
            self.update(Text(f"No GPU: {reason}", style="yellow"))
            return
        if not status.gpus:
            self.update(
                Text(f"No GPU: {status.reason or 'none visible'}. Training runs on the CPU (slow).", style="yellow")
            )
            return
        width = max(20, self.content_size.width or 78)
        gpus = status.gpus
        # a run on several GPUs lists them all (comma-separated): one bar per GPU of the run
        wanted = {u.strip() for u in (only_uuid or "").split(",") if u.strip()}
        if wanted and any(g.uuid in wanted for g in gpus):
            gpus = [g for g in gpus if g.uuid in wanted]
        lines = Text()
        for i, gpu in enumerate(gpus):
            if i:
                lines.append("\n")
            name = gpu.name if len(gpu.name) <= 22 else gpu.name[:21] + "…"
            lines.append(f"{gpu.index} {name:<22} ", style="bold")
            used, total = gpu.used_gib, gpu.total_gib
            bar_w = max(6, width - 62) if not self.compact else max(6, width - 52)
            lines.append(usage_bar(used, total, bar_w))
            mem = f" {used:5.1f}/{total:.1f} GiB" if used is not None and total is not None else " mem N/A"
            lines.append(mem)
            util = f"{gpu.utilization_pct:3d}%" if gpu.utilization_pct is not None else " N/A"
            lines.append(f"  util {util}")
            if not self.compact and gpu.temperature_c is not None:
                lines.append(f"  {gpu.temperature_c}°C")
        if status.reason:
            lines.append(f"\n{status.reason}", style="dim")
        self.update(lines)
