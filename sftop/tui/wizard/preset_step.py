"""Step 3, the preset: a built-in or saved one, with the common fields editable in place.

Choosing a preset keeps the model and dataset picked in steps 1 and 2.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Checkbox, Input, Select, Static

from sftop.engine.errors import SftopError
from sftop.engine.presets import Preset, list_presets, load_preset, validate
from sftop.tui.wizard.base import Step, StepError, with_fields
from sftop.tui.app_ref import sftop_app

# (input id, label, section, key, kind); an empty max-steps field means "use epochs".
FIELDS = [
    ("lr", "learning rate", "train", "learning_rate", float),
    ("epochs", "epochs", "train", "epochs", float),
    ("max-steps", "max steps", "train", "max_steps", int),
    ("max-length", "max length", "data", "max_length", int),
    ("lora-r", "LoRA r", "lora", "r", int),
]


class PresetStep(Step):
    title = "Preset"

    def compose(self) -> ComposeResult:
        yield Static("Start from a preset, then adjust the common fields (tab moves between them).", classes="help")
        yield Select(
            [(f"{p.name} ({p.origin})", p.name) for p in list_presets()],
            allow_blank=True,
            prompt="keep the current settings",
            id="preset-select",
            compact=True,
        )
        for field_id, label, *_ in FIELDS:
            with Horizontal(classes="field"):
                yield Static(label, classes="field-label")
                yield Input(id=f"field-{field_id}", classes="field-input", compact=True)
        with Horizontal(classes="field"):
            yield Static("4-bit (QLoRA)", classes="field-label")
            yield Checkbox("load the base weights as NF4", id="field-4bit", compact=True)
        yield Static("", id="preset-description", classes="note")

    def load(self, draft: Preset) -> None:
        self._base = draft
        self.fill(draft)

    def fill(self, preset: Preset) -> None:
        for field_id, _, section, key, _ in FIELDS:
            value = getattr(getattr(preset, section), key)
            self.query_one(f"#field-{field_id}", Input).value = (
                "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            )
        box = self.query_one("#field-4bit", Checkbox)
        box.value = preset.model.load_in_4bit
        if self._no_gpu():
            # 4-bit needs CUDA: not offered without a GPU, though a preset that asks for it can
            # still be unticked here (else the plan refuses it).
            box.label = "load the base weights as NF4 (needs an NVIDIA GPU; none here)"
            box.disabled = not box.value
        self.query_one("#preset-description", Static).update(preset.description)

    def _no_gpu(self) -> bool:
        if not hasattr(self, "_gpu_absent"):
            self._gpu_absent = sftop_app(self).services.gpu_reader().best() is None
        return self._gpu_absent

    @on(Select.Changed, "#preset-select")
    def on_preset(self, event: Select.Changed) -> None:
        if event.value is Select.NULL or not isinstance(event.value, str):
            return
        try:
            chosen, _ = load_preset(event.value)
        except SftopError as exc:
            self.notify(str(exc), severity="error")
            return
        base = self._base
        # The model and dataset come from steps 1 and 2; the rest from the chosen preset.
        fields = {"model": {"name": base.model.name}, "data": {"source": base.data.source}}
        if chosen.train.task != base.train.task:  # the task picked with the dataset in step 2 stays
            fields.update(train={"task": base.train.task}, data={**fields["data"], "format": "auto"})
        self._base = with_fields(chosen, **fields)
        self.fill(self._base)

    def apply(self, draft: Preset) -> Preset:
        base = getattr(self, "_base", draft)
        data = base.model_dump(mode="json", exclude_none=True)
        # The model and dataset come from steps 1 and 2, whatever preset was picked here.
        data["model"]["name"] = draft.model.name
        data["data"]["source"] = draft.data.source
        data["train"]["task"] = draft.train.task  # picked with the dataset in step 2
        for field_id, label, section, key, kind in FIELDS:
            raw = self.query_one(f"#field-{field_id}", Input).value.strip()
            if not raw:
                if key == "max_steps":  # empty: train for the epochs instead
                    data[section].pop(key, None)
                    continue
                raise StepError(f"{label} is empty")
            try:
                number = float(raw)
            except ValueError:
                raise StepError(f"{label}: {raw!r} is not a number") from None
            if kind is int:
                if not number.is_integer():
                    raise StepError(f"{label} must be a whole number, not {raw}")
                number = int(number)
            data[section][key] = number
        data["model"]["load_in_4bit"] = self.query_one("#field-4bit", Checkbox).value
        try:
            return validate(data, "the wizard")
        except SftopError as exc:
            raise StepError(str(exc)) from None
