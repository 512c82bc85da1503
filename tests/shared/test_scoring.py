from __future__ import annotations

import pytest

from shared.scoring import JsonFields, LabelSet, exact_match, get_scorer, normalize, score_all


def test_normalize_and_exact_match() -> None:
    assert normalize("  Fresh.\n") == "fresh"
    assert normalize('"The  capital\tis Paris!"') == "the capital is paris"
    assert exact_match("Rotten.", "rotten") == 1.0
    assert exact_match("rotten, I think", "rotten") == 0.0
    assert get_scorer(None) is exact_match and get_scorer("exact") is exact_match


def test_label_set_takes_the_first_label_named() -> None:
    s = get_scorer("label_set:fresh,rotten")
    assert isinstance(s, LabelSet)
    assert s("Fresh: the review is positive", "fresh") == 1.0
    assert s("This one is rotten, not fresh", "rotten") == 1.0
    assert s("refreshing", "fresh") == 0.0  # whole words only
    assert s("no idea", "fresh") == 0.0


def test_json_fields() -> None:
    s = get_scorer("json_fields:name,age")
    assert isinstance(s, JsonFields)
    ref = '{"name": "Ada", "age": 36, "city": "London"}'
    assert s('Here: {"name": "Ada", "age": 36}', ref) == 1.0
    assert s('{"name": "Ada", "age": 37}', ref) == 0.5
    assert s("not json", ref) == 0.0
    assert get_scorer("json_fields")('{"a": 1}', '{"a": 1}') == 1.0


def test_pluggable_and_unknown() -> None:
    assert get_scorer("shared.scoring:exact_match") is exact_match
    with pytest.raises(ValueError):
        get_scorer("nope")
    with pytest.raises(ValueError):
        get_scorer("label_set:")


def test_score_all() -> None:
    report = score_all(["fresh", "Rotten", "fresh"], ["fresh", "rotten", "rotten"], exact_match)
    assert report.n == 3 and report.per_item == (1.0, 1.0, 0.0)
    assert report.score == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_all(["a"], [], exact_match)
