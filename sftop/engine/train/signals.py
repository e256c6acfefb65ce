"""SIGTERM/SIGINT: stop cleanly after the current step; a second Ctrl-C (SIGINT) stops at once,
a second SIGTERM (`sftop stop` twice) changes nothing. SIGHUP is ignored.

The immediate exit records the step of the newest checkpoint on disk: the step a resume starts from.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from sftop.engine.events import SCHEMA_VERSION


class StopSignals:
    """Installs the handlers in the main thread; `requested` names the first signal received."""

    def __init__(self, events_path: Path, current_step: Callable[[], int], latest_checkpoint: Callable[[], str | None]):
        self.requested: str | None = None
        self._events_path = Path(events_path)
        self._current_step = current_step
        self._latest_checkpoint = latest_checkpoint
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; an embedding caller keeps its own
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if hasattr(signal, "SIGHUP"):
            # The run must outlive a dropped SSH session even if it was started in the foreground.
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(
                f"\nsftop: {name} received: finishing this step, saving a checkpoint, then stopping "
                f"(press Ctrl-C again to stop at once, without saving)",
                flush=True,
            )
            return
        if signum != signal.SIGINT:
            # A second `sftop stop` (SIGTERM) must not throw away the checkpoint being written:
            # only a second Ctrl-C in the run's own terminal means "stop at once".
            print(f"sftop: {name} received: already stopping (saving a checkpoint first)", flush=True)
            return
        # Second Ctrl-C: leave now. The EventWriter's lock may be held by the interrupted code in this
        # very thread, so write the last record through a separate file handle instead.
        record = {
            "v": SCHEMA_VERSION,
            "type": "run_stopped",
            "time": time.time(),
            "step": self._safe(self._current_step),
            "signal": f"{self.requested}+{name}",
            "checkpoint": self._safe(self._latest_checkpoint),
        }
        try:
            with open(self._events_path, "a", encoding="utf-8") as fh:
                fh.write("\n" + json.dumps(record) + "\n")  # leading newline ends any torn line
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            os._exit(128 + signum)

    @staticmethod
    def _safe(fn):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - best effort while exiting
            return None
