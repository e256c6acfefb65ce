"""Batches for vision-language fine-tuning, built through the family's own processor.

A row (a `Conversation` whose `ImagePart`s hold PIL RGB images the data layer already resized to
the family's rules) goes through the family's chat template and processor, so the model receives
exactly the tensors it expects (`pixel_values`, `image_grid_thw`, `pixel_attention_mask`,
`token_type_ids`, `cross_attention_mask`, ...). The labels come from sftop's own masking:

- assistant turns are found with the text path's template-boundary method (the conversation is
  rendered up to each assistant turn, `sftop.engine.data.tokenize.Encoder`), on the render
  *before* the processor expands each image placeholder into its image tokens; the turn
  boundaries are then moved past the expansions, which the family computes from image sizes;
- every image token of the family (`VisionFamily.image_token_strings`: placeholders, soft tokens,
  begin/end and row/column markers) and all padding are -100, whatever `loss_on` says.

`VisionCollator.encode_row` does this without pixels: it gives a row's exact token count (image
tokens included) and labels, so the run can drop rows over `data.max_length` (never truncate
through image tokens) and the planner can count image tokens. Collating re-checks that the
processor's real input ids equal that encoding, row by row, so a drift between the two is an
error, not a silent mis-masking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from sftop.engine.data.conversation import Conversation, ImagePart, TextPart
from sftop.engine.data.formats import RowError
from sftop.engine.data.images import ImageRules
from sftop.engine.data.tokenize import IGNORE_INDEX, Encoder
from sftop.engine.models.vision.family import VisionFamily


@dataclass
class VisionRow:
    """One row as the model sees it, without pixel tensors."""

    input_ids: list[int]
    labels: list[int]
    image_sizes: list[tuple[int, int]]  # (width, height) of each image, in order
    image_tokens: int  # tokens of the row that belong to images (never trained)
    source_index: int
    text: str = field(repr=False, default="")  # the chat-template render (placeholders not yet expanded)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def row_images(conv: Conversation) -> list[Any]:
    return [p.image for m in conv.messages for p in m.content if isinstance(p, ImagePart)]


class _VisionEncoder(Encoder):
    """The text path's encoder, rendering through the processor's template with image parts."""

    def __init__(self, processor: Any, *, loss_on: str, image_ids: set[int]):
        super().__init__(processor.tokenizer, loss_on=loss_on)
        self.processor = processor
        self.special_ids.update(image_ids)

    def template_messages(self, conv: Conversation) -> list[dict]:
        messages = []
        for m in conv.messages:
            parts = [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in m.content
            ]
            messages.append({"role": m.role, "content": parts})
        return messages

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _end_by_content(self, full: str, through: str, content, start: int) -> int:
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        return super()._end_by_content(full, through, content, start)


class VisionCollator:
    """Encodes rows and collates batches for one family and one processor.

    `loss_on`: "assistant" (default) trains only the assistant turns (their end-of-turn token
    included); "all" trains every token that is neither an image token nor padding.
    `rules`: the image rules the data layer resized with (the family's defaults unless the preset
    changed the pixel budget); the processor is configured to keep those sizes
    (`VisionFamily.configure_processor`), which changes the processor object passed in.
    """

    def __init__(
        self,
        family: VisionFamily,
        processor: Any,
        *,
        loss_on: str = "assistant",
        max_length: int | None = None,
        rules: ImageRules | None = None,
    ):
        if loss_on not in ("assistant", "all"):
            raise ValueError(f'loss_on must be "assistant" or "all", not {loss_on!r}')
        self.family = family
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.loss_on = loss_on
        self.max_length = max_length
        self.rules = rules or family.image_rules
        family.configure_processor(processor, self.rules)
        self.image_ids = self.image_token_ids(family, processor)
        self.placeholder = family.image_placeholder(processor)
        self._encoder = _VisionEncoder(processor, loss_on=loss_on, image_ids=self.image_ids)
        self._adds_bos: bool | None = None

    @staticmethod
    def image_token_ids(family: VisionFamily, processor: Any) -> set[int]:
        """Ids of the family's image tokens that this tokenizer has (a checkpoint may lack a
        secondary one, such as a video placeholder); the image placeholder itself must be there."""
        tokenizer = processor.tokenizer
        ids = {}
        for token in family.image_token_strings:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids[token] = token_id
        placeholder = family.image_placeholder(processor)
        if placeholder not in ids:
            raise ValueError(
                f"{family.display_name}: the tokenizer has no token {placeholder!r}, which stands for each image in "
                "this family's prompts; is the processor the one of this model?"
            )
        return set(ids.values())

    @property
    def special_ids(self) -> set[int]:
        """The tokenizer's special ids and the family's image ids (for the text path's check that
        assistant turns end with an end-of-turn token)."""
        return self._encoder.special_ids

    # -- one row ----------------------------------------------------------------------------------

    def render(self, conv: Conversation) -> str:
        """The chat-template render of a row, with one placeholder per image (not yet expanded)."""
        return self._encoder._render_full(conv)

    def encode_row(self, conv: Conversation) -> VisionRow:
        """A row's exact input ids and labels, images expanded, without pixel tensors.

        Raises `RowError` (with what to do next) when the row cannot be trained on: a plain-text
        document, more images than the family takes, a template that drops or adds image
        markers, nothing to train on, or more tokens than `max_length` with its image tokens
        (the row is then dropped, never truncated).
        """
        if conv.is_document:
            raise RowError("a plain-text document; vision fine-tuning takes conversations (messages with images)")
        images = row_images(conv)
        if len(images) > 1 and not self.family.supports_multiple_images:
            raise RowError(f"{len(images)} images, but {self.family.display_name} takes one image per row")
        sizes = [tuple(image.size) for image in images]
        rendered = self.render(conv)
        bos = self._bos_to_add(rendered)
        full = bos + rendered
        expanded, shift = self._expand(full, sizes)
        spans = None
        if self.loss_on == "assistant":
            spans = [
                (shift(len(bos) + start), shift(len(bos) + end))
                for start, end in self._encoder.assistant_spans(conv, rendered)
            ]
        enc = self.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=self._encoder._fast)
        ids, mask = self._encoder.encode_chat(conv, full=expanded, enc=enc, spans=spans)
        image_tokens = sum(1 for t in ids if t in self.image_ids)
        labels = [t if m and t not in self.image_ids else IGNORE_INDEX for t, m in zip(ids, mask)]
        if self.max_length is not None and len(ids) > self.max_length:
            raise RowError(
                f"{len(ids)} tokens ({image_tokens} of them for {len(images)} image(s)), longer than "
                f"data.max_length = {self.max_length}: dropped, since cutting through image tokens breaks the row "
                "(raise data.max_length or lower data.max_pixels)"
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise RowError("no tokens to train on after tokenisation")
        return VisionRow(ids, labels, sizes, image_tokens, conv.source_index, full)

    def _bos_to_add(self, rendered: str) -> str:
        """The BOS token where the tokenizer adds one and the template does not write it.

        Rows are tokenised without the tokenizer's own special tokens, since most templates write
        BOS themselves; some (LLaVA 1.5's) rely on the tokenizer adding it, as the processor does
        by default, and the model was trained with it.
        """
        if self._adds_bos is None:
            bos_id = self.tokenizer.bos_token_id
            ids = self.tokenizer("a", add_special_tokens=True)["input_ids"] if bos_id is not None else []
            self._adds_bos = bool(ids) and ids[0] == bos_id
        bos = self.tokenizer.bos_token
        return bos if self._adds_bos and not rendered.startswith(bos) else ""

    def _expand(self, full: str, sizes: Sequence[tuple[int, int]]):
        """`full` with each image placeholder expanded, and a map of character positions into it."""
        pieces, moved = [], []  # moved: (position in `full` after which text moves, by how much)
        at = 0
        for width, height in sizes:
            found = full.find(self.placeholder, at)
            if found < 0:
                break
            expansion = self.family.image_expansion(self.processor, width, height)
            pieces += [full[at:found], expansion]
            at = found + len(self.placeholder)
            moved.append((found, len(expansion) - len(self.placeholder)))
        markers = len(moved) + full.count(self.placeholder, at)
        if markers != len(sizes):
            raise RowError(
                f"the chat template placed {markers} image marker(s) for {len(sizes)} image(s); "
                "each image must be one image part of a message"
            )
        pieces.append(full[at:])

        def shift(position: int) -> int:
            return position + sum(delta for start, delta in moved if start < position)

        return "".join(pieces), shift

    # -- a batch ---------------------------------------------------------------------------------

    def __call__(self, conversations: Sequence[Conversation]) -> dict[str, Any]:
        import torch

        rows = [self.encode_row(conv) for conv in conversations]
        images = [row_images(conv) for conv in conversations]
        if any(images) and not all(images) and not self.family.mixes_text_only_rows:
            text_only = [row.source_index for row, imgs in zip(rows, images) if not imgs]
            raise ValueError(
                f"{self.family.display_name} cannot batch rows without images (rows {text_only}) with rows that have "
                "them: drop the text-only rows, or train with a micro-batch of 1"
            )
        kwargs = dict(self.family.processor_kwargs(self.rules))
        batch = self.processor(
            text=[row.text for row in rows],
            images=self.family.processor_images(images) if any(images) else None,
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
            **kwargs,
        )
        input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, row in enumerate(rows):
            positions = attention[i].nonzero().flatten()
            got = input_ids[i, positions].tolist()
            if got != row.input_ids:
                raise RuntimeError(
                    f"{self.family.display_name}: the processor made {len(got)} tokens of row {row.source_index} where "
                    f"{row.length} were expected from its image sizes {row.image_sizes}; the images must already be "
                    "resized to the family's rules (sftop's data layer does this) so the processor keeps them"
                )
            labels[i, positions] = torch.tensor(row.labels, dtype=labels.dtype)
        batch["labels"] = labels
        return dict(batch)
