"""Checks a run passes before it gets a run directory: a preset whose data cannot train fails
in seconds, with the data check's reasons, and leaves nothing behind to clean up."""

from __future__ import annotations

from sftop.engine.errors import DataError

# Rows checked up front: enough to catch a wrong format or a file of broken rows at once,
# few enough that a large dataset is not tokenized twice.
PREFLIGHT_ROWS = 2000


def check_data_before_run(preset) -> None:
    """Raise `DataError` (with the check's verdict) when a run of `preset` would stop on its data."""
    from sftop.engine.data.check import check_data, render_check

    result = check_data(preset, max_rows=PREFLIGHT_ROWS)
    if not result.would_stop:
        return
    verdict = render_check(result).splitlines()
    problems = [line.strip() for line in verdict if line.strip().startswith("row ")][:3]
    if result.usable_rows == 0:
        what = f"No row of {result.rows_read:,} checked can be trained on"
    else:
        what = (
            f"{result.bad_fraction:.1%} of the rows checked are unusable, more than "
            f"data.max_bad_fraction = {result.max_bad_fraction:g}"
        )
    raise DataError(
        what + (": " + "; ".join(problems) if problems else ""),
        where=f"data.source = {preset.data.source!r}",
        hint=f"`sftop data check {preset.name}` lists every problem; fix the rows or raise data.max_bad_fraction",
    )
