"""Recognise a dataset's layout and turn each row into a `Conversation`.

Supported layouts (the `data.format` values):

- `messages`: `{"messages": [{"role": "user", "content": "..."}, ...]}`; content may be a string
  or a list of parts (`{"type": "text", "text": ...}`, `{"type": "image", ...}`).
- `sharegpt`: `{"conversations": [{"from": "human", "value": "..."}, ...]}`.
- `prompt_completion`: `{"prompt": ..., "completion": ...}`, both strings (one user turn, one
  assistant turn) or both message lists.
- `alpaca`: `{"instruction": ..., "input": ..., "output": ...}` (`input` and `system` optional).
- `text`: `{"text": "..."}`, a plain document trained on in full.

A row that does not fit raises `RowError` with a reason meant for the user; the caller records it
against the row index and carries on.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from sftop.engine.data.conversation import Conversation, ImagePart, Message, Part, TextPart
from sftop.engine.errors import DataError

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")

# Columns that identify a format, checked in this order: a row with `messages` and `text` is a
# chat (the `text` column is often a pre-rendered copy).
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt_completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
)
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = dict(_SIGNATURES)

# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


class RowError(ValueError):
    """One row cannot be used; the message says why in the user's terms."""


def detect_format(columns: Iterable[str], *, source: str = "the dataset") -> str:
    cols = set(columns)
    for name, required in _SIGNATURES:
        if all(c in cols for c in required):
            return name
    shown = ", ".join(sorted(cols)) or "none"
    raise DataError(
        f"Cannot tell the format of {source}: its columns are {shown}",
        where=source,
        hint=(
            "sftop reads rows with `messages` (role/content), `conversations` (ShareGPT from/value), "
            "`prompt` + `completion`, `instruction` + `output` (Alpaca) or `text`. Map your column names "
            'to these in the preset, e.g. for question/answer rows: [data.columns] prompt = "question", '
            'completion = "answer" (on the command line: --set data.columns.prompt=question '
            "--set data.columns.completion=answer), or set `data.format` to say which layout the rows follow"
        ),
    )


def check_forced_format(fmt: str, columns: Iterable[str], *, source: str) -> None:
    cols = set(columns)
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in cols]
    if missing:
        shown = ", ".join(sorted(cols)) or "none"
        raise DataError(
            f"data.format is `{fmt}`, but {source} has no {' / '.join(f'`{m}`' for m in missing)} column "
            f"(its columns are {shown})",
            where=source,
            hint='Set `data.format = "auto"` to detect the layout, or fix the column names',
        )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    name = {
        "str": "string",
        "int": "number",
        "float": "number",
        "bool": "boolean",
        "dict": "object",
        "list": "list",
    }.get(type(value).__name__, type(value).__name__)
    return name


def _a(value: Any) -> str:
    name = _describe(value)
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _text(value: Any, what: str) -> str:
    if value is None:
        raise RowError(f"{what} is missing")
    if not isinstance(value, str):
        raise RowError(f"{what} is {_a(value)}, expected a string")
    return value


def _parts(content: Any, what: str) -> tuple[Part, ...]:
    if content is None:
        raise RowError(f"{what} is missing")
    if isinstance(content, str):
        return (TextPart(content),)
    if not isinstance(content, list):
        raise RowError(f"{what} is {_a(content)}, expected a string or a list of parts")
    parts: list[Part] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            parts.append(TextPart(part))
            continue
        if not isinstance(part, dict):
            raise RowError(f"{what} part {j} is {_a(part)}, expected an object with a `type`")
        kind = part.get("type")
        if kind == "text":
            parts.append(TextPart(_text(part.get("text"), f"{what} part {j} text")))
        elif kind in ("image", "image_url"):
            parts.append(ImagePart(_image_ref(part)))
        elif kind is None and "text" in part:
            parts.append(TextPart(_text(part["text"], f"{what} part {j} text")))
        else:
            raise RowError(f"{what} part {j} has unsupported type {kind!r}")
    return tuple(parts)


def _image_ref(part: dict) -> Any:
    """The image an image part points to, under any key chat templates and datasets use; None for a
    placeholder (`{"type": "image"}`) that an image column fills."""
    for key in ("image", "image_url", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    if isinstance(part.get("base64"), str):
        return "data:image;base64," + part["base64"]
    return None


def _message_list(
    value: Any,
    what: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    role_map: dict[str, str] | None = None,
) -> list[Message]:
    if value is None:
        raise RowError(f"`{what}` is missing")
    if isinstance(value, str) and value.lstrip().startswith("["):
        # CSV cells and some exports hold the message list as JSON text.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"`{what}` holds text that is not a valid JSON list ({exc.msg})") from None
    if not isinstance(value, list):
        raise RowError(f"`{what}` is {_a(value)}, expected a list of messages")
    messages = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise RowError(f"{what}[{i}] is {_a(raw)}, expected an object")
        # Accept either key style in either format: mixed files are common.
        role = raw.get(role_key, raw.get("role", raw.get("from")))
        content = raw[content_key] if content_key in raw else raw.get("content", raw.get("value"))
        if role is None:
            raise RowError(f"{what}[{i}] has no `{role_key}`")
        if not isinstance(role, str):
            raise RowError(f"{what}[{i}] `{role_key}` is {_a(role)}, expected a string")
        if role_map is not None:
            mapped = role_map.get(role.lower())
            if mapped is None:
                known = ", ".join(sorted(role_map))
                raise RowError(f"{what}[{i}] has unknown speaker {role!r} (known: {known})")
            role = mapped
        else:
            # Speaker names like "human"/"gpt"/"model" also turn up in role/content data.
            role = SHAREGPT_ROLES.get(role.lower(), role)
        messages.append(Message(role, _parts(content, f"{what}[{i}] content")))
    return messages


def normalise_row(row: dict, fmt: str, index: int = -1) -> Conversation:
    """Turn one raw row into a `Conversation`, or raise `RowError`."""
    if not isinstance(row, dict):
        raise RowError(f"row is {_a(row)}, expected an object")
    if fmt == "messages":
        msgs = _message_list(row.get("messages"), "messages")
    elif fmt == "sharegpt":
        msgs = _message_list(
            row.get("conversations"),
            "conversations",
            role_key="from",
            content_key="value",
            role_map=SHAREGPT_ROLES,
        )
        system = row.get("system")  # LLaMA-Factory's ShareGPT layout keeps it beside the turns
        if isinstance(system, str) and system.strip() and not (msgs and msgs[0].role == "system"):
            msgs.insert(0, Message.text("system", system))
    elif fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is None:
            raise RowError("`prompt` is missing")
        if completion is None:
            raise RowError("`completion` is missing")
        if isinstance(prompt, list) or isinstance(completion, list):
            # Conversational form; a plain string on either side stands for one message.
            msgs = ([Message.text("user", prompt)] if isinstance(prompt, str) else _message_list(prompt, "prompt")) + (
                [Message.text("assistant", completion)]
                if isinstance(completion, str)
                else _message_list(completion, "completion")
            )
        else:
            msgs = [
                Message.text("user", _text(prompt, "`prompt`")),
                Message.text("assistant", _text(completion, "`completion`")),
            ]
    elif fmt == "alpaca":
        instruction = _text(row.get("instruction"), "`instruction`")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError(f"`input` is {_a(extra)}, expected a string")
        user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
        msgs = []
        system = row.get("system")
        if isinstance(system, str) and system.strip():
            msgs.append(Message.text("system", system))
        msgs += [Message.text("user", user), Message.text("assistant", _text(row.get("output"), "`output`"))]
    elif fmt == "text":
        return Conversation(document=_text(row.get("text"), "`text`"), source_index=index)
    else:  # pragma: no cover - the preset schema allows only the formats above
        raise ValueError(f"unknown format {fmt!r}")
    # An empty system message is a common export artefact, not a mistake worth losing the row over.
    msgs = [m for m in msgs if not (m.role == "system" and not m.text_content.strip() and not m.has_image)]
    return Conversation(messages=tuple(msgs), source_index=index)
