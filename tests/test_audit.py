"""saeflow audit's filters and output formats (the MLflow query is covered end to end in
test_pipeline_e2e.py)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from flows.audit import COLUMNS, format_rows, matches, parse_filter

ROWS = [
    {"version": 2, "penalty": "topk", "beta": None, "rho": None, "k": 5, "accuracy": 0.97},
    {"version": 1, "penalty": "kl", "beta": 3.0, "rho": 0.01, "k": None, "accuracy": 0.95},
]


@pytest.mark.parametrize("text, kept", [
    ("beta>=1", [1]), ("beta<1", []), ("penalty=topk", [2]), ("penalty != kl", [2]),
    ("k==5", [2]), ("accuracy > 0.96", [2]), ("rho<=0.01", [1]),
])
def test_filters(text, kept):
    flt = parse_filter(text)
    assert [r["version"] for r in ROWS if matches(r, flt)] == kept


@pytest.mark.parametrize("text, message", [
    ("beta", "expected COLUMN OP VALUE"), ("beta>=", "expected COLUMN OP VALUE"),
    ("nope=1", "unknown column 'nope'"),
])
def test_bad_filter_is_a_one_line_error(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_filter(text)
    assert "\n" not in str(info.value)


def test_ordering_a_text_column_matches_nothing():
    """'beta>=1' on a row whose beta is blank or text keeps nothing, rather than guess."""
    assert not matches({"beta": None}, parse_filter("beta>=1"))
    assert not matches({"beta": "n/a"}, parse_filter("beta>=1"))


def test_json_and_csv_round_trip():
    rows = json.loads(format_rows(ROWS, "json"))
    assert rows == ROWS
    parsed = list(csv.DictReader(io.StringIO(format_rows(ROWS, "csv"))))
    assert list(parsed[0]) == list(COLUMNS)
    assert [r["penalty"] for r in parsed] == ["topk", "kl"]
    assert parsed[0]["beta"] == "" and parsed[1]["beta"] == "3.0"


def test_table_is_aligned_with_a_header():
    lines = format_rows(ROWS, "table").splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "decision", "penalty"]
    assert len(lines) == 3
    assert lines[1].index("topk") == lines[0].index("penalty")
    assert format_rows([], "table") == "no registered model versions match\n"


@pytest.mark.parametrize("text, message", [
    ("beta>>1", r"unexpected '>' at position 6 \(after beta>\); expected a value"),
    ("beta=<1", r"unexpected '<' at position 6"),
    ("beta>=abc", r">= compares numbers; 'abc' is not a number"),
    ("penalty<kl", r"< compares numbers; 'kl' is not a number"),
])
def test_malformed_or_mistyped_filters_are_refused_where_they_go_wrong(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_filter(text)
    assert "\n" not in str(info.value)
