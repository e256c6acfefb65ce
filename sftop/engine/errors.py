"""Errors that reach the user as one paragraph: what is wrong, where, and what to do next.

Anything raised as `SftopError` is printed by the CLI without a traceback and exits non-zero;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SftopError(Exception):
    """A problem the user can fix. `where` names the file, row or key; `hint` says what to do."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.where:
            parts.append(f"Where: {self.where}.")
        if self.hint:
            parts.append(self.hint.rstrip(".") + ".")
        return " ".join(parts)


class PresetError(SftopError):
    """A preset file or `--set` override is invalid."""


class DataError(SftopError):
    """The dataset cannot be read, or too many of its rows are unusable."""


class ModelError(SftopError):
    """The model cannot be found or loaded."""


class ResourceError(SftopError):
    """Not enough disk or GPU memory for the run as configured."""

    exit_code = 3
    # Set by the planner's refusal: GiB the smallest plan needs, and the changes that would fit.
    needed_gib: float | None = None
    options: list[str] | None = None
