"""docs/events.md documents every event type and every field the code writes."""

import dataclasses
import re
from pathlib import Path

from sftop.engine import events

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def _documented() -> dict[str, set[str]]:
    sections = re.split(r"^### `([a-z_]+)`\s*$", DOC.read_text(encoding="utf-8"), flags=re.M)
    return {
        name: set(re.findall(r"^\| `([a-z_0-9]+)` \|", body, flags=re.M))
        for name, body in zip(sections[1::2], sections[2::2])
    }


def test_every_event_and_field_is_documented():
    documented = _documented()
    classes = [
        c
        for c in vars(events).values()
        if isinstance(c, type) and issubclass(c, events.Event) and c is not events.Event
    ]
    assert len(classes) == 12  # a new event type must be documented: this count makes that visible
    for cls in classes:
        kind = cls.__dataclass_fields__["type"].default
        fields = {f.name for f in dataclasses.fields(cls) if f.name != "type"}
        assert kind in documented, kind
        assert documented[kind] == fields, (kind, documented[kind] ^ fields)
