from sftop.engine.durations import format_duration


def test_spelled_out_for_plans():
    assert format_duration(42.4) == "42 s"
    assert format_duration(187) == "3 min 07 s"
    assert format_duration(2 * 3600 + 5 * 60 + 59) == "2 h 05 min"


def test_compact_for_status_lines():
    assert format_duration(42.6, compact=True) == "43s"
    assert format_duration(187, compact=True) == "3m07s"
    assert format_duration(3600, compact=True) == "1h00m"


def test_unknown_and_negative():
    assert format_duration(None) == "-"
    assert format_duration(-3, compact=True) == "0s"
