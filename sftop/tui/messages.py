"""Messages posted by workers (threads) to screens; handlers update the widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class EventsRead(Message):
    """A batch of new records from events.jsonl; `replayed` once the history is read."""

    records: list[dict[str, Any]]
    replayed: bool


@dataclass
class LogTail(Message):
    lines: list[str]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LogTail)


@dataclass
class GpuRead(Message):
    status: Any  # GpuStatus, or a str saying why there is none

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, GpuRead)


@dataclass
class RunStatusRead(Message):
    status: str

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunStatusRead)


@dataclass
class RunsRead(Message):
    runs: list[Any]  # RunSummary
