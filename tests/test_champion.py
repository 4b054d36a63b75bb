"""The champion gate's rule and settings, and the model URIs of `saeflow reproduce`
(no servers: the end-to-end behaviour is in test_retrain.py)."""

from __future__ import annotations

import pytest

from flows.champion import CHALLENGER, FIRST, PROMOTED, GateSettings, decide
from flows.reproduce import _setting, parse_model_uri


def gate(**kw) -> GateSettings:
    return GateSettings.from_params({"retrain": kw}, "params.yaml")


def test_the_first_model_becomes_champion():
    d = decide("1", 0.9, None, None, gate())
    assert (d.outcome, d.champion, d.champion_value) == (FIRST, None, None)


@pytest.mark.parametrize("direction, new, old, margin, outcome", [
    ("maximize", 0.95, 0.90, 0.0, PROMOTED),
    ("maximize", 0.90, 0.90, 0.0, CHALLENGER),  # a tie keeps the champion
    ("maximize", 0.89, 0.90, 0.0, CHALLENGER),
    ("maximize", 0.905, 0.90, 0.01, CHALLENGER),  # better, but by less than the margin
    ("maximize", 0.92, 0.90, 0.01, PROMOTED),
    ("minimize", 0.20, 0.30, 0.0, PROMOTED),  # e.g. sparsity/fvu
    ("minimize", 0.35, 0.30, 0.0, CHALLENGER),
])
def test_promotion_needs_a_strict_gain_of_at_least_the_margin(direction, new, old, margin,
                                                               outcome):
    d = decide("5", new, "4", old, gate(direction=direction, min_improvement=margin))
    assert d.outcome == outcome
    assert d.champion == "4" and d.value == new and d.champion_value == old
    tags = d.tags("2026-01-01T00:00:00Z", None)
    assert tags["saeflow.decision"] == outcome and tags["saeflow.champion_version"] == "4"
    assert str(new) in d.reason and str(old) in d.reason


@pytest.mark.parametrize("section, message", [
    ({"metric": "accuracy"}, "retrain.metric must be score/<key> or sparsity/<key>"),
    ({"metric": "train/loss"}, "retrain.metric must be"),
    ({"direction": "up"}, "retrain.direction must be maximize or minimize"),
    ({"min_improvement": -0.1}, "retrain.min_improvement must be a number >= 0"),
    ({"min_improvement": float("nan")}, "retrain.min_improvement must be a number >= 0"),
    ({"min_improvement": True}, "retrain.min_improvement must be a number >= 0"),
    ({"metrc": "score/accuracy"}, "unknown key(s) in retrain: metrc"),
])
def test_bad_retrain_settings_are_one_line_errors(section, message):
    with pytest.raises(ValueError, match=r"^params\.yaml: ") as err:
        gate(**section)
    assert message in str(err.value)


def test_defaults_compare_the_downstream_accuracy():
    g = GateSettings.from_params({}, "params.yaml")
    assert (g.metric, g.direction, g.min_improvement) == ("score/accuracy", "maximize", 0.0)


@pytest.mark.parametrize("uri, parsed", [
    ("models:/saeflow-sae@champion", ("saeflow-sae", None, "champion")),
    ("models:/saeflow-sae/7", ("saeflow-sae", "7", None)),
    ("saeflow-sae/12", ("saeflow-sae", "12", None)),
])
def test_model_uris(uri, parsed):
    assert parse_model_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["models:/", "models:/x/latest", "models:/x@", "runs:/abc/model"])
def test_bad_model_uris_are_refused(uri):
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS"):
        parse_model_uri(uri)


@pytest.mark.parametrize("text, value", [
    ("3.0", 3.0), ("1e-09", 1e-9), ("25", 25), ("None", None), ("True", True),
    ("kl", "kl"), ("1f", "1f"), ("[3, 3]", [3, 3]), ("0.00015378700499807767",
                                                     0.00015378700499807767)])
def test_recorded_settings_are_read_back_with_their_types(text, value):
    assert _setting(text) == value and type(_setting(text)) is type(value)
