import pytest

from sftop.engine.data.builtin import BUILTINS, builtin_names, load_builtin
from sftop.engine.data.formats import detect_format
from sftop.engine.data.sources import RawRows
from sftop.engine.data.validate import validate_rows


def test_builtins_are_deterministic():
    for name in builtin_names():
        assert load_builtin(name) == load_builtin(name)


def test_arithmetic_rows_are_correct_and_short():
    rows = load_builtin("builtin:arithmetic")
    assert 300 <= len(rows) <= 2000
    assert rows[0] == load_builtin("arithmetic")[0]
    for row in rows:
        user, assistant = row["messages"]
        question = user["content"].removeprefix("What is ").removesuffix("?")
        assert assistant["content"] == str(eval(question))
        assert len(assistant["content"]) <= 2 and not assistant["content"].startswith("-")
    questions = {r["messages"][0]["content"] for r in rows}
    assert len(questions) == 80  # every single-digit sum but the held-out ones


def test_held_out_sums_are_never_trained_on_but_their_mirrors_are():
    from sftop.engine.data.builtin import HELD_OUT_SUMS, held_out_sum_prompts

    questions = {r["messages"][0]["content"] for r in load_builtin("builtin:arithmetic")}
    assert len(HELD_OUT_SUMS) == 20
    for (a, b), (question, answer) in zip(HELD_OUT_SUMS, held_out_sum_prompts()):
        assert question not in questions and answer == str(a + b)
        assert f"What is {b}+{a}?" in questions


def test_reverse_rows():
    rows = load_builtin("builtin:reverse")
    for row in rows[:50]:
        user, assistant = row["messages"]
        assert user["content"].removeprefix("Reverse: ")[::-1] == assistant["content"]


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("sample-messages", "messages"),
        ("sample-sharegpt", "sharegpt"),
        ("sample-prompt-completion", "prompt_completion"),
        ("sample-alpaca", "alpaca"),
        ("sample-text", "text"),
    ],
)
def test_format_samples_detect_and_validate(name, fmt):
    rows = load_builtin(name)
    raw = RawRows(source=name, kind="builtin", rows=rows)
    assert detect_format(raw.columns) == fmt
    good, report = validate_rows(raw, fmt, "assistant")
    assert report.bad_rows == 0 and len(good) == len(rows) == 24


def test_every_builtin_is_listed():
    assert set(builtin_names()) == {"builtin:" + n for n in BUILTINS}


def test_the_demo_shows_answers_to_held_out_sums():
    from sftop.engine.data.builtin import held_out_sum_prompts
    from sftop.engine.presets import load_preset

    demo, _ = load_preset("demo")
    held = {q for q, _ in held_out_sum_prompts()}
    assert len(demo.train.sample_prompts) >= 3 and set(demo.train.sample_prompts) <= held
