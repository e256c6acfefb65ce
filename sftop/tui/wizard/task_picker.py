"""The wizard's task picker (SFT or DPO) and what the dataset check shows for preference pairs.

The task decides how the dataset is read: SFT trains on conversations, DPO on preference pairs (a
prompt with a chosen and a rejected answer).  The picker sits on the dataset step, so switching it
checks the dataset again as that task reads it.  Keys: shift+tab from the samples list reaches it,
left/right move between the two, enter or space picks.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import RadioButton, RadioSet

TASKS = (("sft", "SFT: conversations"), ("dpo", "DPO: preference pairs"))


class TaskPicker(RadioSet):
    """One radio button per task; `chosen_task` is the one pressed."""

    def __init__(self, task: str = "sft", **kwargs):
        super().__init__(**kwargs)
        self._initial = task

    def compose(self) -> ComposeResult:
        for task, label in TASKS:
            yield RadioButton(label, value=task == self._initial, id=f"task-{task}", compact=True)

    @property
    def chosen_task(self) -> str:
        index = self.pressed_index
        return TASKS[index][0] if index >= 0 else "sft"

    def show(self, task: str) -> None:
        """Press `task`'s button without telling the step (it is the draft's task already)."""
        for name, _ in TASKS:
            button = self.query_one(f"#task-{name}", RadioButton)
            with button.prevent(RadioButton.Changed):
                button.value = name == task


def task_fields(draft: Any, task: str) -> dict:
    """`with_fields` sections that switch `draft` to `task`: a data.format of the other task's kind
    goes back to auto-detection (preference layouts are read only by DPO, conversations only by SFT)."""
    from sftop.engine.presets.schema import PREFERENCE_FORMATS

    fields: dict = {"train": {"task": task}}
    fmt = draft.data.format
    if fmt != "auto" and (fmt in PREFERENCE_FORMATS) != (task == "dpo"):
        fields["data"] = {"format": "auto"}
    return fields


def preference_lines(result: Any) -> list[Text]:
    """The data check's lines only preference pairs have: each side's token lengths, the pairs
    dropped as too long, and their images (a vision-language model).  [] for an SFT check."""
    stats: Any = getattr(result, "stats", None)
    if stats is None or not hasattr(stats, "pair_max"):
        return []
    lengths = Text()
    for name in ("prompt", "chosen", "rejected"):
        summary = getattr(stats, name)
        lengths.append(f"{name} ", style="dim")
        lengths.append(f"p50 {summary.p50:,} · max {summary.max:,}   ")
    lines = [lengths]
    if stats.too_long:
        lines.append(
            Text(
                f"{stats.too_long:,} pairs over max length {result.max_length:,} dropped (never truncated)",
                style="yellow",
            )
        )
    images = getattr(result, "images", None)
    if images:
        lines.append(
            Text(
                f"images {images['images']:,} in {images['pairs_with_images']:,} pairs, "
                f"{images['image_tokens_max']:,} image tokens per side at most",
                style="dim",
            )
        )
    return lines


def rejected_sample(result: Any) -> Text:
    """The sample pair's rejected answer, under its prompt and chosen answer."""
    rejected = getattr(result, "sample_rejected", "")
    if not rejected:
        return Text()
    text = Text("\nrejected: ", style="dim")
    text.append(rejected.strip(), style="black on red")
    return text
