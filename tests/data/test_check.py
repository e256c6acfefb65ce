import json
import re

import pytest
from data_tokenizers import make_tokenizer

from sftop.engine.data.check import check_data, render_check
from sftop.engine.presets.schema import Preset


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("char", "chatml")


def test_check_arithmetic_numbers_and_sample(tok):
    result = check_data(Preset(data={"source": "builtin:arithmetic", "max_length": 64}), tok)
    s = result.stats
    assert (result.rows_read, result.usable_rows, result.bad_rows, result.format) == (1000, 1000, 0, "messages")
    assert not result.would_stop and s.length_p50 <= s.length_p90 <= s.length_p99 <= s.length_max <= 64
    assert result.sample_index == 0
    assert result.sample_spans == [
        ("<|im_start|>user\nWhat is 6+9?<|im_end|>\n<|im_start|>assistant\n", False),
        ("15<|im_end|>", True),
        ("\n", False),
    ]
    text = render_check(result, color=False)
    assert "1,000 read, 1,000 usable, 0 skipped" in text
    assert f"p50 {s.length_p50} · p90 {s.length_p90} · p99 {s.length_p99} · max {s.length_max}" in text
    assert f"{s.trained_share:.1%} of {s.tokens:,} tokens" in text
    assert "messages format (detected)" in text and "OK: a run would train on 1,000 rows." in text
    assert "«15<|im_end|>»" in text and "\x1b[" not in text
    json.dumps(result.to_dict())


def test_check_colour_dims_the_untrained_part(tok):
    text = render_check(check_data(Preset(data={"source": "builtin:arithmetic"}), tok), color=True)
    assert "  \x1b[2m<|im_start|>user\x1b[0m\n  \x1b[2mWhat is 6+9?<|im_end|>\x1b[0m" in text
    assert text.endswith("\n  15<|im_end|>") and "«" not in text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "1,000 usable" in plain


def test_check_lists_problems_and_verdict(tok):
    result = check_data(Preset(data={"source": "builtin:sample-broken"}), tok)
    assert result.would_stop and result.bad_rows == 4 and result.usable_rows == 16
    assert [p.index for p in result.problems] == [3, 7, 11, 15]
    text = render_check(result)
    assert "20 read, 16 usable, 4 skipped" in text
    assert "row 3: no assistant message to train on" in text and "row 15: messages[0] content is a number" in text
    assert "STOP: 20.0% of rows are unusable, more than data.max_bad_fraction = 0.05" in text
    relaxed = check_data(Preset(data={"source": "builtin:sample-broken", "max_bad_fraction": 0.25}), tok)
    assert not relaxed.would_stop and "OK: a run would train on 16 rows (4 skipped)." in render_check(relaxed)


def test_check_caps_the_problem_list(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}]} for i in range(70)]
    rows += [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = check_data(Preset(data={"source": str(path), "max_rows": 71}), tok)
    assert result.bad_rows == 70 and len(result.problems) == 50
    text = render_check(result)
    assert "70 × no assistant message to train on" in text and "… and 60 more row(s)" in text
    assert text.count("\n  row ") == 10


def test_check_mentions_max_rows(tok):
    text = render_check(check_data(Preset(data={"source": "builtin:arithmetic", "max_rows": 10}), tok))
    assert "10 read (first 10 of 1,000: data.max_rows)" in text


def test_check_with_the_demo_models_tokenizer():
    # The path `sftop data check demo` takes: no tokenizer given, the model section names it.
    result = check_data(
        Preset(model={"name": "builtin:demo-tiny"}, data={"source": "builtin:arithmetic", "max_length": 64})
    )
    assert result.usable_rows == 1000 and result.stats.length_max <= 64
    assert [text for text, trained in result.sample_spans if trained] == ["15<|im_end|>"]
    assert "tokenizer of builtin:demo-tiny" in render_check(result)


def test_warns_when_turns_end_without_a_special_token():
    tok = make_tokenizer("char", "chatml")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    result = check_data(Preset(data={"source": "builtin:sample-messages"}), tok)
    assert len(result.warnings) == 1 and "without a special end-of-turn token" in result.warnings[0]
    assert "Warning: The chat template closes assistant turns" in render_check(result)
    assert (
        check_data(Preset(data={"source": "builtin:sample-messages"}), make_tokenizer("char", "chatml")).warnings == []
    )


def test_quick_check_reads_only_the_first_rows(tok):
    result = check_data(Preset(data={"source": "builtin:arithmetic"}), tok, max_rows=50)
    assert result.rows_read == 50 and result.rows_in_source == 1000 and result.quick
    assert "50 read (first 50 of 1,000: a quick check)" in render_check(result)
    full = check_data(Preset(data={"source": "builtin:arithmetic", "max_rows": 20}), tok, max_rows=50)
    assert full.rows_read == 20 and not full.quick  # the preset's own limit is smaller


def test_check_shows_the_eval_hold_out(tok):
    result = check_data(Preset(data={"source": "builtin:arithmetic", "eval_fraction": 0.1}), tok)
    assert result.eval_rows == 100 and "eval      100 rows held out" in render_check(result)
    assert "eval " not in render_check(check_data(Preset(data={"source": "builtin:arithmetic"}), tok))
