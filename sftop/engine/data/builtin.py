"""Small generated datasets that ship with sftop, named `builtin:NAME` in `data.source`.

They make the demo and the tests work offline. Every set is generated from a fixed seed, so the
same name always yields the same rows.

- `arithmetic`: "What is 7+5?" -> "12", single-digit sums, one or two characters long, so the
  demo's tiny model learns them in the demo preset's few minutes on a CPU. Twenty of the hundred
  sums (`HELD_OUT_SUMS`) never appear in it: the demo asks the model those, so what it shows is
  learned arithmetic (each one's mirror, 5+7 for 7+5, is in the data), not recalled rows.
- `reverse`: "Reverse: kato" -> "otak" on short made-up words.
- `sample-messages`, `sample-sharegpt`, `sample-prompt-completion`, `sample-alpaca`, `sample-text`:
  the same kind of rows in each supported layout, to show format detection (`sftop data check`).
- `sample-broken`: chat rows of which a few are malformed, to show how problems are reported.
- `arithmetic-preferences`: the arithmetic questions as preference pairs (`prompt`, `chosen`,
  `rejected`): the correct answer chosen, a plausible wrong one rejected (off by one, the other
  operation, or the digits swapped), for the `demo-dpo` preset.
- `shapes`: pictures of coloured shapes with short questions on colour, shape, count and position,
  single- and two-image rows, for vision-language models (see `shapes.py`).
- `shapes-preferences`: 1,000 of those questions as preference pairs with their images: the right
  answer chosen, another answer of the same kind rejected, for vision-language DPO (the
  `demo-vision-dpo` preset).
"""

from __future__ import annotations

import random
from typing import Callable

from sftop.engine.errors import DataError

PREFIX = "builtin:"
_SEED = 1234


def _held_out_sums(count: int = 20, seed: int = _SEED) -> tuple[tuple[int, int], ...]:
    """Sums a+b (a != b) kept out of `arithmetic`; never both a+b and b+a."""
    rng = random.Random(seed)
    candidates = [(a, b) for a in range(10) for b in range(a + 1, 10)]
    return tuple(sorted((a, b) if rng.random() < 0.5 else (b, a) for a, b in rng.sample(candidates, count)))


HELD_OUT_SUMS = _held_out_sums()


def sum_question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def held_out_sum_prompts() -> list[tuple[str, str]]:
    """(question, answer) for every held-out sum: what the demo is tested and shown on."""
    return [(sum_question(a, b), str(a + b)) for a, b in HELD_OUT_SUMS]


def _sum_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    held = set(HELD_OUT_SUMS)
    known = [(a, b) for a in range(10) for b in range(10) if (a, b) not in held]
    return [(sum_question(a, b), str(a + b)) for a, b in (rng.choice(known) for _ in range(n))]


def _arithmetic_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            pairs.append((f"What is {a}+{b}?", str(a + b)))
        else:
            a, b = max(a, b), min(a, b)  # no negative answers: keeps them short
            pairs.append((f"What is {a}-{b}?", str(a - b)))
    return pairs


_LETTERS = "abdefiklmnoprstu"


def _reverse_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))
        pairs.append((f"Reverse: {word}", word[::-1]))
    return pairs


def _chat(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def arithmetic() -> list[dict]:
    return _chat(_sum_pairs(1000, _SEED))


def reverse() -> list[dict]:
    return _chat(_reverse_pairs(1000, _SEED + 1))


def _mixed(n: int) -> list[tuple[str, str]]:
    a, r = _arithmetic_pairs(n, _SEED + 2), _reverse_pairs(n, _SEED + 3)
    return [p for pair in zip(a, r) for p in pair][:n]


def sample_messages() -> list[dict]:
    rows = _chat(_mixed(24))
    # Content-parts form, as multimodal datasets store it, alongside plain string content.
    rows[1]["messages"][0]["content"] = [{"type": "text", "text": rows[1]["messages"][0]["content"]}]
    rows[2]["messages"].insert(0, {"role": "system", "content": "Answer with the result only."})
    return rows


def sample_sharegpt() -> list[dict]:
    rows = []
    for i, (q, a) in enumerate(_mixed(24)):
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if i % 6 == 0:
            conv.insert(0, {"from": "system", "value": "Answer with the result only."})
        rows.append({"conversations": conv})
    return rows


def sample_prompt_completion() -> list[dict]:
    return [{"prompt": q, "completion": a} for q, a in _mixed(24)]


def sample_alpaca() -> list[dict]:
    rows = []
    for q, a in _mixed(24):
        instruction, _, rest = q.partition(": ")
        if rest:  # "Reverse: word" -> instruction + input
            rows.append({"instruction": f"{instruction} the word.", "input": rest, "output": a})
        else:
            rows.append({"instruction": q, "input": "", "output": a})
    return rows


def sample_text() -> list[dict]:
    return [{"text": f"Q: {q}\nA: {a}"} for q, a in _mixed(24)]


def sample_broken() -> list[dict]:
    rows = _chat(_mixed(20))
    rows[3] = {"messages": [{"role": "user", "content": "What is 2+2?"}]}  # no assistant turn
    rows[7]["messages"][1]["content"] = ""  # empty answer
    rows[11]["messages"] = [rows[11]["messages"][1], rows[11]["messages"][0]]  # assistant first
    rows[15]["messages"][0]["content"] = 42  # not a string
    return rows


def _plausible_wrong(question: str, answer: str, rng: random.Random) -> str:
    a, op, b = int(question[8]), question[9], int(question[10])
    right = int(answer)
    options = {right + 1, max(0, right - 1), abs(a - b) if op == "+" else a + b}
    if len(answer) == 2:
        options.add(int(answer[::-1]))
    options.discard(right)
    return str(rng.choice(sorted(options)))


def arithmetic_preferences() -> list[dict]:
    rng = random.Random(_SEED + 4)
    return [
        {"prompt": q, "chosen": a, "rejected": _plausible_wrong(q, a, rng)} for q, a in _arithmetic_pairs(1000, _SEED)
    ]


def shapes() -> list[dict]:
    from sftop.engine.data.shapes import shapes as generate  # Pillow is imported only when asked for

    return generate()


def shapes_preferences() -> list[dict]:
    from sftop.engine.data.shapes import shapes_preferences as generate

    return generate()


BUILTINS: dict[str, Callable[[], list[dict]]] = {
    "arithmetic": arithmetic,
    "reverse": reverse,
    "sample-messages": sample_messages,
    "sample-sharegpt": sample_sharegpt,
    "sample-prompt-completion": sample_prompt_completion,
    "sample-alpaca": sample_alpaca,
    "sample-text": sample_text,
    "sample-broken": sample_broken,
    "arithmetic-preferences": arithmetic_preferences,
    "shapes": shapes,
    "shapes-preferences": shapes_preferences,
}


def builtin_names() -> list[str]:
    return [PREFIX + name for name in BUILTINS]


def load_builtin(source: str) -> list[dict]:
    name = source[len(PREFIX) :] if source.startswith(PREFIX) else source
    if name not in BUILTINS:
        raise DataError(
            f"There is no built-in dataset named `{name}`",
            where=f"data.source = {source!r}",
            hint="Built-in datasets: " + ", ".join(builtin_names()),
        )
    return BUILTINS[name]()
