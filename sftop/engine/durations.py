"""Durations as people read them, one way for the whole tool: `sftop plan`'s estimates and the
dashboard's elapsed time and ETA."""

from __future__ import annotations


def format_duration(seconds: float | None, *, compact: bool = False) -> str:
    """`2 h 05 min`, `3 min 07 s`, `42 s`; `compact` (a dashboard status line): `2h05m`, `3m07s`, `42s`.
    None (not known yet) is `-`."""
    if seconds is None:
        return "-"
    whole = max(0, int(round(seconds)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if compact:
        if hours:
            return f"{hours}h{minutes:02d}m"
        return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
