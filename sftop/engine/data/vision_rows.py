"""Rows with images: find them, and put each image where it belongs in the conversation.

A vision dataset uses one of the text layouts (`messages`, `sharegpt`, `prompt_completion`,
`alpaca`; see `formats`) and carries its images in one of these ways, all normalised to
`ImagePart`s placed in the message content where the image is shown to the model:

- inline in the message parts: `{"type": "image", "image": <PIL image | bytes | {"bytes", "path"}
  | path>}` (also `image_url` parts); nothing else is needed;
- an image column (`images`, a list per row, or `image`, one per row or a list) and placeholders in the parts, `{"type": "image"}` without data
  (TRL's layout): the column's images fill the placeholders in order;
- an image column and `<image>` markers in the text (LLaVA / ShareGPT / LLaMA-Factory layout): the
  text is split at each marker and the images go there, in order;
- an image column and neither: all the row's images go before the text of the first user turn
  (what TRL does with string content).

A row whose placeholders or markers do not match its images in number is a bad row
(`RowError`), as is an image column holding something that is not an image reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from sftop.engine.data.conversation import Conversation, ImagePart, Message, Part, TextPart
from sftop.engine.data.formats import RowError, normalise_row

# Columns that hold a row's images, in the order they are looked for.
IMAGE_COLUMNS: tuple[str, ...] = ("images", "image")
IMAGE_MARKER = "<image>"


def find_image_column(columns: Iterable[str]) -> str | None:
    """The column a dataset keeps its images in, or None."""
    cols = set(columns)
    return next((c for c in IMAGE_COLUMNS if c in cols), None)


def images_in_cell(value: Any, column: str) -> list:
    """The image references one row's image column holds (a list, one reference, or nothing)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):  # CSV cells hold a list as JSON text
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RowError(f"`{column}` holds text that is not a valid JSON list ({exc.msg})") from None
            if not isinstance(value, list):
                raise RowError(f"`{column}` holds JSON that is not a list")
        else:
            return [text]
    if isinstance(value, (list, tuple)):
        refs = list(value)
        for j, ref in enumerate(refs):
            if ref is None or (isinstance(ref, str) and not ref.strip()):
                raise RowError(f"`{column}`[{j}] is empty")
        return refs
    return [value]  # one PIL image, bytes, or a {"bytes", "path"} dict


def count_images(conv: Conversation) -> int:
    return sum(1 for m in conv.messages for p in m.content if isinstance(p, ImagePart))


def _is_placeholder(part: Part) -> bool:
    return isinstance(part, ImagePart) and (part.image is None or part.image == "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _split_at_markers(text: str, images: list, taken: list[int]) -> list[Part]:
    parts: list[Part] = []
    pieces = text.split(IMAGE_MARKER)
    for k, piece in enumerate(pieces):
        # The newline that usually sits beside a marker is layout, not content.
        if k > 0 and piece.startswith("\n"):
            piece = piece[1:]
        if k < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            parts.append(TextPart(piece))
        if k < len(pieces) - 1:
            parts.append(ImagePart(images[taken[0]]))
            taken[0] += 1
    return parts


def attach_images(conv: Conversation, images: list, *, column: str | None = None) -> Conversation:
    """`conv` with `images` (the row's image column) placed where they belong; see the module doc.

    Raises `RowError` when placeholders or markers do not match the images in number.
    """
    where = f"`{column}`" if column else "its image column"
    placeholders = sum(1 for m in conv.messages for p in m.content if _is_placeholder(p))
    if conv.is_document:
        if images:
            raise RowError(
                f"a plain-text row cannot carry images ({_plural(len(images), 'image')} in {where}); "
                "use the messages or prompt/completion layout"
            )
        return conv
    if placeholders:
        if placeholders != len(images):
            has = f"{_plural(len(images), 'image')} in {where}" if column else "no image column"
            raise RowError(
                f"image placeholders do not match the images: the messages hold "
                f'{_plural(placeholders, "image placeholder")} ({{"type": "image"}} parts without data) '
                f"but the row has {has}"
            )
        it = iter(images)
        filled = tuple(
            Message(m.role, tuple(ImagePart(next(it)) if _is_placeholder(p) else p for p in m.content))
            for m in conv.messages
        )
        return Conversation(messages=filled, source_index=conv.source_index)
    if column is None:
        return conv  # a text dataset: `<image>` in its text is just text
    markers = sum(p.text.count(IMAGE_MARKER) for m in conv.messages for p in m.content if isinstance(p, TextPart))
    if markers:
        if markers != len(images):
            raise RowError(
                f"image placeholders do not match the images: the text holds "
                f"{_plural(markers, f'`{IMAGE_MARKER}` marker')} but the row has {_plural(len(images), 'image')} in {where}"
            )
        taken = [0]
        split: list[Message] = []
        for m in conv.messages:
            content: list[Part] = []
            for p in m.content:
                if isinstance(p, TextPart) and IMAGE_MARKER in p.text:
                    content += _split_at_markers(p.text, images, taken)
                else:
                    content.append(p)
            split.append(Message(m.role, tuple(content)))
        return Conversation(messages=tuple(split), source_index=conv.source_index)
    if not images:
        return conv
    first_user = next((i for i, m in enumerate(conv.messages) if m.role == "user"), None)
    if first_user is None:
        raise RowError(f"the row has {_plural(len(images), 'image')} in {where} but no user message to show them in")
    shown = list(conv.messages)
    m = shown[first_user]
    shown[first_user] = Message(m.role, tuple(ImagePart(ref) for ref in images) + m.content)
    return Conversation(messages=tuple(shown), source_index=conv.source_index)


def normalise_image_row(row: dict, fmt: str, index: int = -1, image_column: str | None = None) -> Conversation:
    """`formats.normalise_row`, then the row's images attached (see `attach_images`)."""
    conv = normalise_row(row, fmt, index)
    images = images_in_cell(row.get(image_column), image_column) if image_column else []
    return attach_images(conv, images, column=image_column)


def is_image_dataset(columns: Iterable[str], conversations: Iterable[Conversation] = ()) -> bool:
    """True when the rows carry images: an image column, or image parts in the messages."""
    if find_image_column(columns) is not None:
        return True
    return any(count_images(c) for c in conversations)


def dataset_base_dir(source: str, kind: str) -> Path | None:
    """The folder relative image paths in a source are resolved against: the data file's folder."""
    if kind in ("builtin", "hub"):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent.resolve()
    if path.is_dir():
        return path.resolve()
    return None
