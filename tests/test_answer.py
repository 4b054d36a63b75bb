"""The answer section (sae_core.answer): every sentence against the numbers it quotes,
recomputed here from the recorded dynamics, for a beta 3 run, a beta 0 run, and runs
where a claim would be false."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sae_core.answer import Sentence, answer, answers, baseline_problem, fmt, pick_baseline
from sae_core.config import SAEConfig
from sae_core.dynamics import TERM_COLUMNS, Dynamics, DynamicsRecorder
from sae_core.train import Trainer

N, S = 12, 6


def _fit(beta: float, X: np.ndarray | None = None) -> Dynamics:
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(400, N)) if X is None else X
    cfg = SAEConfig(n_components=S, rho=0.05, beta=beta, weight_decay=1e-3, device="cpu",
                    dtype="float64", max_iter=60)
    rec = DynamicsRecorder(X, every=10)
    Trainer(cfg, N, [rec]).fit(X)
    return rec.result()


@pytest.fixture(scope="module")
def runs() -> dict[str, Dynamics]:
    return {"beta3": _fit(3.0), "beta0": _fit(0.0)}


def _kl(rho, q):
    return rho * np.log(rho / q) + (1 - rho) * np.log((1 - rho) / (1 - q))


def expected_numbers(s: Sentence, d: Dynamics, base: Dynamics | None) -> dict[str, float]:
    """The numbers each kind of sentence must quote, recomputed from the dynamics."""
    first, last = d.rho_hat[0], d.rho_hat[-1]
    above = d.rho_hat > d.rho
    if s.key == "kl_term" and d.beta == 0:
        return {"beta": 0}
    if s.key == "kl_term":
        # the first sample's KL term is also beta * sum KL(rho || rho_hat) of its rho_hat
        assert d.terms["sparsity"][0] == pytest.approx(d.beta * _kl(d.rho, first).sum(),
                                                       rel=1e-10)
        return {"kl_first": d.terms["sparsity"][0], "kl_last": d.terms["sparsity"][-1],
                "iteration_first": 0, "iteration_last": d.iteration[-1]}
    if s.key == "rho_hat":
        return {"rho_hat_first": first.mean(), "rho_hat_last": last.mean(), "rho": d.rho,
                "near": ((last >= d.rho / 2) & (last <= 2 * d.rho)).sum(), "units": S}
    if s.key == "biases":
        return {"b1_fall": d.b1[0].mean() - d.b1[-1].mean(), "b1_first": d.b1[0].mean(),
                "b1_last": d.b1[-1].mean(), "negative": (d.b1[-1] < 0).sum(), "units": S}
    if s.key == "delta" and d.beta == 0:
        return {"beta": 0}
    if s.key == "delta":
        pos = d.delta > 0
        return {"positive_first": (pos[0] & above[0]).sum(), "above_first": above[0].sum(),
                "units": S, "positive_pairs": (pos & above).sum(), "above_pairs": above.sum(),
                "delta_first": d.delta[0].mean(), "delta_last": d.delta[-1].mean()}
    R, R0 = d.terms["reconstruction"][-1], base.terms["reconstruction"][-1]
    if s.key == "reconstruction":
        return {"given_up": R - R0, "reconstruction": R, "reconstruction_0": R0}
    if s.key == "total":
        D0 = base.terms["weight_decay"][-1]
        K0 = d.beta * _kl(d.rho, base.rho_hat[-1]).sum()
        want = {"J": d.terms["loss"][-1], "J_0": R0 + D0 + K0, "reconstruction_0": R0,
                "weight_decay_0": D0, "kl_0": K0, "beta": d.beta}
        # J_0 is the beta run's objective at the beta 0 model's parameters: its terms
        # add up to it, and the beta 0 run's own loss is J_0 without the KL term
        assert base.terms["loss"][-1] == pytest.approx(R0 + D0, rel=1e-12)
        if s.holds:  # the trade is quoted only where it happened
            want["kl"] = d.terms["sparsity"][-1]
        return want
    raise AssertionError(f"unexpected sentence {s.key}")


def check(sentences: list[Sentence], d: Dynamics, base: Dynamics | None = None) -> None:
    """Each sentence quotes exactly the recomputed numbers, each written in its text."""
    for s in sentences:
        want = expected_numbers(s, d, base)
        assert set(s.numbers) == set(want), s.key
        for name, value in s.numbers.items():
            assert value == pytest.approx(float(want[name]), rel=1e-12, abs=1e-15), (s.key, name)
            assert fmt(value) in s.text, (s.key, name, s.text)


def test_beta_3_run_against_beta_0_every_sentence_holds_and_quotes_its_numbers(runs):
    d, base = runs["beta3"], runs["beta0"]
    sentences = answer(d, base)
    assert [s.key for s in sentences] == ["kl_term", "rho_hat", "biases", "delta",
                                          "reconstruction", "total"]
    check(sentences, d, base)
    assert all(s.holds for s in sentences), [s.text for s in sentences if not s.holds]
    by = {s.key: s for s in sentences}
    assert by["kl_term"].numbers["kl_last"] < by["kl_term"].numbers["kl_first"]
    assert "falls from" in by["kl_term"].text
    assert by["rho_hat"].numbers["rho_hat_last"] < by["rho_hat"].numbers["rho_hat_first"]
    assert by["biases"].numbers["b1_fall"] > 0 and "fall by" in by["biases"].text
    n = by["delta"].numbers
    assert n["positive_pairs"] == n["above_pairs"] > 0
    assert by["reconstruction"].numbers["given_up"] > 0 and "gives up" in by["reconstruction"].text
    assert by["total"].numbers["J"] < by["total"].numbers["J_0"]
    assert "is lower for this run" in by["total"].text


def test_beta_0_run_says_that_nothing_pushes_the_units_down(runs):
    d = runs["beta0"]
    sentences = answer(d, runs["beta3"])  # a beta 0 run is not set against another run
    assert [s.key for s in sentences] == ["kl_term", "rho_hat", "biases", "delta"]
    check(sentences, d)
    by = {s.key: s for s in sentences}
    assert not by["kl_term"].holds and "no KL term" in by["kl_term"].text
    assert not by["delta"].holds and "nothing pushes" in by["delta"].text
    assert not by["rho_hat"].holds and not by["biases"].holds
    # here rho_hat ends far above the target: the sentence must not claim it fell to it
    assert by["rho_hat"].numbers["near"] == 0
    falls = by["rho_hat"].numbers["rho_hat_last"] < by["rho_hat"].numbers["rho_hat_first"]
    assert ("does not fall" in by["rho_hat"].text) == (not falls)
    assert "falls from" not in by["kl_term"].text


def _reversed(d: Dynamics) -> Dynamics:
    """The run played backwards: rho_hat, the biases and the KL term all rise."""
    return replace(d, rho_hat=d.rho_hat[::-1].copy(), b1=d.b1[::-1].copy(),
                   delta=d.delta[::-1].copy(),
                   terms={k: v[::-1].copy() for k, v in d.terms.items()})


def test_claims_that_would_be_false_are_phrased_as_not_holding(runs):
    d = _reversed(runs["beta3"])
    sentences = answer(d)
    by = {s.key: s for s in sentences}
    assert "does not fall" in by["kl_term"].text and not by["kl_term"].holds
    assert "rho_hat does not fall" in by["rho_hat"].text and not by["rho_hat"].holds
    assert "do not fall" in by["biases"].text and not by["biases"].holds
    for s in sentences:  # the quoted numbers are still the run's
        for value in s.numbers.values():
            assert fmt(value) in s.text
    assert by["kl_term"].numbers["kl_first"] == d.terms["sparsity"][0]


def test_a_delta_that_is_not_positive_above_the_target_is_reported(runs):
    d = runs["beta3"]
    flipped = replace(d, delta=-d.delta)
    s = next(s for s in answer(flipped) if s.key == "delta")
    assert not s.holds and "not always positive" in s.text
    assert s.numbers["positive_pairs"] == 0


def test_a_beta_0_run_on_other_data_is_not_compared(runs):
    other = _fit(0.0, np.random.default_rng(1).uniform(0.1, 0.9, size=(400, N)))
    assert baseline_problem(runs["beta3"], other) == "it was trained on other data"
    sentences = answer(runs["beta3"], other)
    assert sentences[-1].key == "baseline" and not sentences[-1].holds
    assert "cannot be set against" in sentences[-1].text
    # among several, the one on the same data is chosen
    pool = [runs["beta3"], other, runs["beta0"]]
    assert pick_baseline(runs["beta3"], pool) is runs["beta0"]
    assert pick_baseline(runs["beta0"], pool) is None
    got = answers([runs["beta3"], None, runs["beta0"]])
    assert [s.key for s in got[0]][-2:] == ["reconstruction", "total"] and got[1] == []


def test_no_total_claim_when_the_beta_run_is_not_lower(runs):
    d, base = runs["beta3"], runs["beta0"]
    worse = replace(d, terms={**d.terms, "loss": d.terms["loss"] + 1e6})
    total = next(s for s in answer(worse, base) if s.key == "total")
    assert not total.holds and "is not lower" in total.text
    check([total], worse, base)


def test_other_penalties_say_the_question_does_not_apply(runs):
    d = replace(runs["beta3"], penalty="l1", delta=np.full_like(runs["beta3"].delta, np.nan))
    first = answer(d)[0]
    assert first.key == "penalty" and not first.holds and "no KL term" in first.text
    assert fmt(d.rho_hat[0].mean()) in first.text


def test_terms_that_were_not_recorded_are_not_quoted(runs):
    d = runs["beta3"]
    blank = replace(d, terms={k: np.full_like(v, np.nan) for k, v in d.terms.items()})
    s = answer(blank)[0]
    assert not s.holds and s.numbers == {} and "not recorded" in s.text
    assert set(TERM_COLUMNS) == set(d.terms)


def test_the_report_shows_the_sentences_escaped():
    from sae_core.report import RunSummary, render_report

    page = render_report([RunSummary("run", answer=["rho_hat < 2 & falls", "second"])])
    assert "<li>rho_hat &lt; 2 &amp; falls</li><li>second</li>" in page
    two = render_report([RunSummary("a", answer=["only a"]), RunSummary("b")])
    assert "<h3>a</h3>" in two and "only a" in two
    with pytest.raises(ValueError, match="answer of run 'x' must be a sequence of strings"):
        RunSummary("x", answer="one string")
