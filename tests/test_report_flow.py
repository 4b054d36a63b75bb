"""saeflow report's run labels and sweep detection (the MLflow side is covered end to end
in test_pipeline_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace

from flows.report import _labels, sweep_setting


def _run(run_id: str, name: str, **params):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name),
                           data=SimpleNamespace(params=params, metrics={}, tags={}))


def test_labels_are_unique_even_for_identical_settings():
    runs = [_run("aaaaaaaa11", "kl-beta3.0-rho0.01", **{"train.beta": "3.0"}),
            _run("bbbbbbbb22", "kl-beta3.0-rho0.01", **{"train.beta": "3.0"})]
    labels = _labels(runs, [])
    assert len(set(labels)) == 2
    assert labels[0].endswith("[aaaaaaaa]")


def test_labels_name_the_differing_settings_training_first():
    runs = [_run("a1", "r", **{"train.beta": "1", "score.C": "1"}),
            _run("b2", "r", **{"train.beta": "3", "score.C": "2"})]
    assert _labels(runs, ["score.C", "train.beta"]) == ["r (train.beta=1, score.C=1)",
                                                        "r (train.beta=3, score.C=2)"]


def test_sweep_only_over_one_sweepable_setting():
    a = _run("a", "a", **{"train.beta": "1", "train.k": "None"})
    b = _run("b", "b", **{"train.beta": "3", "train.k": "None"})
    c = _run("c", "c", **{"train.beta": "3", "train.k": "5"})
    assert sweep_setting([a, b]) == "train.beta"
    assert sweep_setting([a, c]) is None
    assert sweep_setting([b, b]) is None
