"""The data pipeline: read a source, normalise its rows to chat, validate, tokenise with masks.

Entry points: `prepare_data(preset, tokenizer)` for the trainer, `validate_structure(section)` for
a check before any model is loaded, `check_data(preset)` / `render_check(result)` for
`sftop data check` and the TUI.
"""

from sftop.engine.data.check import DataCheckResult, check_data, render_check
from sftop.engine.data.conversation import Conversation, ImagePart, Message, RowProblem, TextPart
from sftop.engine.data.prepare import DataStats, PreparedData, prepare_data, validate_structure
from sftop.engine.data.validate import ValidationReport

__all__ = [
    "Conversation",
    "DataCheckResult",
    "DataStats",
    "ImagePart",
    "Message",
    "PreparedData",
    "RowProblem",
    "TextPart",
    "ValidationReport",
    "check_data",
    "prepare_data",
    "render_check",
    "validate_structure",
]
