"""The running app, typed: Textual types a widget's or screen's `.app` as a plain `App`, so the
screens reach sftop's own app-level actions and services through `sftop_app(self)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from textual.message_pump import MessagePump

    from sftop.tui.app import SftopApp


def sftop_app(node: MessagePump) -> SftopApp:
    return cast("SftopApp", node.app)
