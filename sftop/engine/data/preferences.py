"""Preference rows (for `train.task = "dpo"`): recognise the layout, turn each row into a `PreferencePair`.

Supported layouts (the `data.format` values when training on preferences):

- `preference`: TRL's explicit-prompt form, `{"prompt": ..., "chosen": ..., "rejected": ...}`
  (raw RLAIF-V rows name the prompt `question`).
  Each is a string (prompt = one user turn, answers = one assistant turn) or a list of messages.
  When `chosen`/`rejected` repeat the prompt's messages before the answer (UltraFeedback-binarized
  rows do), the repeated prompt is recognised and removed.
- `preference_implicit`: TRL's implicit-prompt form, `{"chosen": [...], "rejected": [...]}`, two
  whole conversations; the prompt is the messages they share before they part.  Plain strings
  (Anthropic HH style, "Human: ... Assistant: ...") share their prompt as a text prefix, cut after
  the last "Assistant:" both have in common; such pairs are raw text and skip the chat template.
- `ultrafeedback`: raw UltraFeedback rows, `{"instruction": ..., "completions": [{"response": ...,
  "overall_score": ...}, ...]}`: the best-rated completion is chosen, the worst-rated rejected.
  (UltraFeedback-binarized rows are the `preference` form; with `score_chosen` they report as
  `ultrafeedback` too.)

Images (for vision-language models) ride along unchanged: image parts stay in the messages and an
`images` (or `image`) column is kept on the pair, so the vision data checks and TRL's vision
collator can take them later; a text-only model refuses such rows.

A row that does not fit raises `RowError` with a reason meant for the user; the caller records it
against the row index and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from sftop.engine.data.conversation import Message, RowProblem
from sftop.engine.data.formats import RowError, _a, _message_list
from sftop.engine.errors import DataError
from sftop.engine.presets.schema import PREFERENCE_FORMATS

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "ultrafeedback": ("instruction", "completions"),
}
_SCORE_KEYS = ("overall_score", "score", "rating")


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer.

    Chat pairs hold messages (`prompt` ends before the answers; `chosen`/`rejected` are the answer
    turns).  Raw-text pairs (`text` set) hold the three strings in `text` instead.
    """

    prompt: tuple[Message, ...] = ()
    chosen: tuple[Message, ...] = ()
    rejected: tuple[Message, ...] = ()
    text: tuple[str, str, str] | None = None  # (prompt, chosen, rejected) for raw-text pairs
    images: tuple = ()  # an `images`/`image` column, for vision-language models
    source_index: int = -1

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def has_images(self) -> bool:
        return bool(self.images) or any(m.has_image for m in self.prompt + self.chosen + self.rejected)

    def template_messages(self, side: str) -> list[dict]:
        """prompt + one side (`chosen` or `rejected`; `prompt` alone) with string content."""
        msgs = self.prompt + (getattr(self, side) if side != "prompt" else ())
        return [{"role": m.role, "content": m.text_content} for m in msgs]

    def to_dict(self) -> dict:
        if self.text is not None:
            return dict(zip(("prompt", "chosen", "rejected"), self.text))
        out = {side: [m.to_dict() for m in getattr(self, side)] for side in ("prompt", "chosen", "rejected")}
        if self.images:
            out["images"] = list(self.images)
        return out


def detect_preference_format(columns: Iterable[str], *, source: str = "the dataset") -> str:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        if "score_chosen" in cols and "prompt" in cols:
            return "ultrafeedback"
        # RLAIF-V's raw rows name the prompt `question` (one image per row in `image`)
        return "preference" if cols & {"prompt", "question"} else "preference_implicit"
    if {"instruction", "completions"} <= cols:
        return "ultrafeedback"
    shown = ", ".join(sorted(cols)) or "none"
    raise DataError(
        f"Cannot read {source} as preference pairs: its columns are {shown}",
        where=source,
        hint=(
            'train.task = "dpo" needs `chosen` and `rejected` columns (with or without `prompt`), or '
            'UltraFeedback\'s `instruction` + `completions`. Rename the columns, or set train.task = "sft" '
            "to fine-tune on plain conversations"
        ),
    )


def check_forced_preference_format(fmt: str, columns: Iterable[str], *, source: str) -> None:
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(
            f'data.format is `{fmt}`, which is not a preference layout, but train.task is "dpo"',
            where="data.format",
            hint='Use data.format = "auto", or one of ' + ", ".join(PREFERENCE_FORMATS),
        )
    cols = set(columns)
    need = ("chosen", "rejected") if fmt == "ultrafeedback" and "chosen" in cols else REQUIRED_COLUMNS[fmt]
    if "question" in cols:
        need = tuple(c for c in need if c != "prompt")
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataError(
            f"data.format is `{fmt}`, but {source} has no {' / '.join(f'`{m}`' for m in missing)} column "
            f"(its columns are {', '.join(sorted(cols)) or 'none'})",
            where=source,
            hint='Set `data.format = "auto"` to detect the layout, or fix the column names',
        )


# ----------------------------------------------------------------------------- normalisation


def _side(value: Any, what: str, role: str) -> list[Message]:
    if value is None:
        raise RowError(f"`{what}` is missing")
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [Message.text(role, value)]
    return _message_list(value, what)


def _strip_prompt(prompt: list[Message], side: list[Message]) -> list[Message]:
    n = len(prompt)
    if n and len(side) > n and side[:n] == prompt:
        return side[n:]
    return side


def _shared_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _text_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # cut after the last "Assistant:" both share, so a common first word of the answers stays in them
    cut = chosen.rfind("Assistant:", 0, n)
    if cut >= 0:
        n = cut + len("Assistant:")
    if n == 0:
        raise RowError("`chosen` and `rejected` share no prompt (no common beginning)")
    return chosen[:n], chosen[n:], rejected[n:]


def _images(row: dict) -> tuple:
    images = row.get("images", row.get("image"))
    if images is None:
        return ()
    return tuple(images) if isinstance(images, (list, tuple)) else (images,)


def _score(completion: dict) -> float | None:
    for key in _SCORE_KEYS:
        value = completion.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _ultrafeedback_raw(row: dict) -> PreferencePair:
    instruction = row.get("instruction")
    if not isinstance(instruction, str):
        raise RowError(
            "`instruction` is missing"
            if instruction is None
            else f"`instruction` is {_a(instruction)}, expected a string"
        )
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise RowError(f"`completions` is {_a(completions)}, expected a list of rated answers")
    rated = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise RowError(f"completions[{i}] has no `response` string")
        score = _score(c)
        if score is None:
            raise RowError(f"completions[{i}] has no numeric {' / '.join(_SCORE_KEYS)}")
        rated.append((score, i, c["response"]))
    if len(rated) < 2:
        raise RowError(f"{len(rated)} completion(s): a preference needs at least two")
    best = max(rated, key=lambda t: (t[0], -t[1]))
    worst = min(rated, key=lambda t: (t[0], t[1]))
    if best[0] == worst[0]:
        raise RowError("every completion has the same rating: no preference to learn")
    return PreferencePair(
        prompt=(Message.text("user", instruction),),
        chosen=(Message.text("assistant", best[2]),),
        rejected=(Message.text("assistant", worst[2]),),
        images=_images(row),
    )


def normalise_pair(row: dict, fmt: str, index: int = -1) -> PreferencePair:
    """Turn one raw row into a checked `PreferencePair`, or raise `RowError`."""
    if not isinstance(row, dict):
        raise RowError(f"row is {_a(row)}, expected an object")
    if fmt == "ultrafeedback" and "chosen" not in row:
        pair = _ultrafeedback_raw(row)
    elif fmt in ("preference", "ultrafeedback"):
        prompt_value = row.get("prompt", row.get("question"))
        if prompt_value is None or (isinstance(prompt_value, str) and not prompt_value.strip()):
            raise RowError("`prompt` is missing or empty")
        prompt = _side(prompt_value, "prompt", "user")
        chosen = _strip_prompt(prompt, _side(row.get("chosen"), "chosen", "assistant"))
        rejected = _strip_prompt(prompt, _side(row.get("rejected"), "rejected", "assistant"))
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if side and side[0].role != "assistant":
                raise RowError(
                    f"`{name}` holds a {side[0].role} turn that differs from `prompt`: "
                    "chosen and rejected must answer the row's prompt"
                )
        pair = PreferencePair(tuple(prompt), tuple(chosen), tuple(rejected), images=_images(row))
    elif fmt == "preference_implicit":
        c, r = row.get("chosen"), row.get("rejected")
        if isinstance(c, str) and isinstance(r, str) and not c.lstrip().startswith("["):
            pair = PreferencePair(text=_text_pair(c, r), images=_images(row))
        else:
            cm, rm = _side(c, "chosen", "assistant"), _side(r, "rejected", "assistant")
            if cm == rm:
                raise RowError("`chosen` equals `rejected`: nothing to prefer")
            n = _shared_prefix(cm, rm)
            if n == 0:
                raise RowError("`chosen` and `rejected` share no prompt: their first messages differ")
            if n in (len(cm), len(rm)):
                raise RowError("one of `chosen` / `rejected` is the other cut short: an empty answer")
            if cm[n].role != "assistant" or rm[n].role != "assistant":
                raise RowError("chosen and rejected have different prompts: they part before an assistant turn")
            pair = PreferencePair(tuple(cm[:n]), tuple(cm[n:]), tuple(rm[n:]), images=_images(row))
    else:  # pragma: no cover - resolve_preference_format allows only the formats above
        raise ValueError(f"unknown preference format {fmt!r}")
    _check_pair(pair)
    return PreferencePair(pair.prompt, pair.chosen, pair.rejected, pair.text, pair.images, index)


def _check_pair(pair: PreferencePair) -> None:
    if pair.text is not None:
        prompt, chosen, rejected = pair.text
    else:
        prompt = "".join(m.text_content for m in pair.prompt)
        chosen = "".join(m.text_content for m in pair.chosen)
        rejected = "".join(m.text_content for m in pair.rejected)
        if not pair.prompt or (not prompt.strip() and not any(m.has_image for m in pair.prompt)):
            raise RowError("the prompt is empty")
        if not any(m.role in ("user", "system") for m in pair.prompt):
            raise RowError("the prompt has no user turn")
    if not chosen.strip() and not pair.is_text and not any(m.has_image for m in pair.chosen):
        raise RowError("`chosen` is empty")
    if not rejected.strip() and not pair.is_text and not any(m.has_image for m in pair.rejected):
        raise RowError("`rejected` is empty")
    if pair.is_text and not chosen.strip():
        raise RowError("`chosen` is empty")
    if pair.is_text and not rejected.strip():
        raise RowError("`rejected` is empty")
    if chosen == rejected and (pair.is_text or pair.chosen == pair.rejected):
        raise RowError("`chosen` equals `rejected`: nothing to prefer")


def resolve_preference_format(columns: Iterable[str], forced: str, *, source: str) -> str:
    if forced == "auto":
        return detect_preference_format(columns, source=source)
    check_forced_preference_format(forced, columns, source=source)
    return forced


def validate_pairs(
    rows, fmt: str, errors: dict[int, str] | None = None
) -> tuple[list[PreferencePair], list[RowProblem]]:
    """Structural pass: normalise every row, keep the good pairs, report the rest by index."""
    errors = errors or {}
    good, problems = [], []
    for index, row in enumerate(rows):
        if index in errors:
            problems.append(RowProblem(index, errors[index]))
            continue
        try:
            good.append(normalise_pair(row, fmt, index))
        except RowError as exc:
            problems.append(RowProblem(index, str(exc)))
    return good, problems
