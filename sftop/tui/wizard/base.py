"""What every wizard step does: show the draft preset, and fold its fields back into it."""

from __future__ import annotations

import threading

from textual.containers import Vertical

from sftop.engine.presets import Preset


# One heavy engine call at a time (data check, planning): they import transformers and may build
# the demo model, and two threads doing that at once can trip over each other's imports.
ENGINE_LOCK = threading.Lock()


class StepError(Exception):
    """The step's input cannot be used yet; the message says why and what to do."""


class Step(Vertical):
    title = "step"

    @property
    def wizard(self):
        return self.screen

    def load(self, draft: Preset) -> None:
        """Called each time the step is shown, with the current draft."""

    def apply(self, draft: Preset) -> Preset:
        """Return the draft with this step's choices, or raise StepError."""
        return draft

    def focus_first(self) -> None:
        for widget in self.query("Input, OptionList, Select, DataTable, Button, Checkbox"):
            if widget.focusable and widget.display:
                widget.focus()
                return


def with_fields(draft: Preset, **sections: dict) -> Preset:
    """A copy of `draft` with fields of sections replaced, validated (raises PresetError)."""
    from sftop.engine.presets import validate

    data = draft.model_dump(mode="json", exclude_none=True)
    for section, fields in sections.items():
        if isinstance(fields, dict):
            data.setdefault(section, {}).update(fields)
        else:
            data[section] = fields
    return validate(data, "the wizard")
