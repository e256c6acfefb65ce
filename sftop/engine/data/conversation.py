"""The one shape every dataset row is normalised to before tokenisation.

Messages hold a list of content parts rather than a bare string so that image parts can join text
parts later (VLM fine-tunes) without changing the shape. Plain-text rows become a `Conversation`
with `document` set and no messages: they are trained on in full, since there is no assistant
turn to single out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"

    def to_dict(self) -> dict:
        return {"type": "text", "text": self.text}


@dataclass(frozen=True)
class ImagePart:
    """A reference to an image (path, URL or raw bytes). Text-only models reject rows holding one."""

    image: object
    type: Literal["image"] = "image"

    def to_dict(self) -> dict:
        return {"type": "image", "image": self.image}


Part = Union[TextPart, ImagePart]


@dataclass(frozen=True)
class Message:
    role: str
    content: tuple[Part, ...]

    @classmethod
    def text(cls, role: str, text: str) -> "Message":
        return cls(role, (TextPart(text),))

    @property
    def text_content(self) -> str:
        """The message as one string, for chat templates that take string content."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def has_image(self) -> bool:
        return any(isinstance(p, ImagePart) for p in self.content)

    def to_dict(self) -> dict:
        return {"role": self.role, "content": [p.to_dict() for p in self.content]}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...] = ()
    document: str | None = None  # plain text row: trained on in full
    source_index: int = -1  # row index in the source, for problem reports

    @property
    def is_document(self) -> bool:
        return self.document is not None

    def to_dict(self) -> dict:
        if self.is_document:
            return {"text": self.document}
        return {"messages": [m.to_dict() for m in self.messages]}

    def template_messages(self) -> list[dict]:
        """Messages with string content, the form text-only chat templates expect."""
        return [{"role": m.role, "content": m.text_content} for m in self.messages]


@dataclass
class RowProblem:
    index: int
    reason: str

    def to_dict(self) -> dict:
        return {"index": self.index, "reason": self.reason}
