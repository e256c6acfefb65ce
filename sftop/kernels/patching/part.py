"""What a patch part declares, and the order the registry runs the parts in.

A part is one module under `patching/parts/` holding one `PART = Part(...)`:

- `apply(model, spec)` patches the model in place and returns "fused", or "stock: <why>";
- `requires`: the parts whose results it reads (through their markers) or whose forwards it takes
  over; they run before it.  Where it cannot work without them, its `apply` checks their markers
  and reports "stock: needs <part>" (they may be left out with `only=`, or have stayed stock);
- `provides`: the markers (names in `patching/markers.py`) it leaves for the parts after it;
- `undo(model)`, when it changes more than module forwards (which `unpatch` restores for all).

`resolve_order` turns the registered parts into a run order: every part after the parts it
requires, otherwise in registration order.  A cycle, a requirement no registered part meets, a
name registered twice or an undeclared marker is an error naming the parts involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import markers


class PartOrderError(ValueError):
    """The registered parts cannot be put in an order."""


@dataclass(frozen=True)
class Part:
    name: str
    apply: Callable[[Any, Any], str]  # (model, FamilySpec) -> "fused" | "stock: why"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    undo: Callable[[Any], None] | None = None


def resolve_order(parts: Sequence[Part]) -> tuple[Part, ...]:
    by_name: dict[str, Part] = {}
    for part in parts:
        if part.name in by_name:
            raise PartOrderError(f"patch part {part.name!r} is registered twice")
        by_name[part.name] = part
        unknown = [m for m in part.provides if m not in markers.ALL]
        if unknown:
            raise PartOrderError(
                f"patch part {part.name!r} provides {', '.join(map(repr, unknown))}, which "
                "sftop/kernels/patching/markers.py does not declare; add the marker there"
            )
    for part in parts:
        missing = [r for r in part.requires if r not in by_name]
        if missing:
            raise PartOrderError(
                f"patch part {part.name!r} requires {', '.join(map(repr, missing))}, which no registered part is "
                f"(registered: {', '.join(by_name)}); register it in sftop/kernels/patching/parts/__init__.py"
            )
    order: list[Part] = []
    placed: set[str] = set()
    waiting = list(parts)
    while waiting:
        # the first registered part whose requirements are all placed: registration order wherever
        # the declarations leave a choice
        ready = next((p for p in waiting if all(r in placed for r in p.requires)), None)
        if ready is None:
            raise PartOrderError(f"patch parts require each other in a cycle: {' -> '.join(_cycle(waiting))}")
        order.append(ready)
        placed.add(ready.name)
        waiting.remove(ready)
    return tuple(order)


def _cycle(waiting: list[Part]) -> list[str]:
    """One cycle among parts none of which can be placed (each waits on another of them)."""
    names = {p.name: p for p in waiting}
    path: list[str] = []
    name = waiting[0].name
    while name not in path:
        path.append(name)
        name = next(r for r in names[name].requires if r in names)
    return path[path.index(name) :] + [name]
