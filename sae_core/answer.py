"""The answer to "the KL term adds to the loss, so how can it switch hidden units off?",
in sentences computed from one run's recorded dynamics (:class:`sae_core.dynamics.Dynamics`).

The argument, each step checked against the run's own numbers:

1. the KL term beta * sum_j KL(rho || rho_hat_j) falls over training;
2. the units' mean activations rho_hat_j move down towards the target rho;
3. the hidden biases b1_j fall (units with a negative bias are off unless their input
   drives them);
4. the cause: while rho_hat_j > rho the sparsity delta_j = beta (-rho/rho_hat_j +
   (1-rho)/(1-rho_hat_j)) is positive, and it adds delta_j * mean_i a_ij (1 - a_ij) to
   dJ/db1_j (and delta_j * mean_i a_ij (1 - a_ij) x_i to dJ/dW1_j), a push that lowers
   the unit's pre-activation;
5. and 6., given a ``beta: 0`` run on the same data: reconstruction gives up something,
   and the total J_beta is still lower than at the beta = 0 model's parameters, where
   J_beta(theta_0) = reconstruction_0 + weight decay_0 + beta * sum_j KL(rho || rho_hat_j(theta_0))
   is computed from that run's last sample (its rho_hat on the same rows, its loss terms).

Every sentence is returned with the numbers it quotes (:class:`Sentence`), formatted by
:func:`fmt`, and says whether its claim holds for the run. Where a claim is false for the
run (``beta: 0``, where nothing pushes rho_hat down; a run whose rho_hat did not fall) the
sentence says so instead of claiming it. Pure: numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from sae_core.dynamics import Dynamics

QUESTION = "The KL term adds to the loss, so how can it switch hidden units off?"


def fmt(x: float) -> str:
    """How a sentence writes a number: 4 significant digits (integers exactly)."""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.4g}"


@dataclass(frozen=True)
class Sentence:
    """One sentence of the answer: ``key`` names its claim (kl_term, rho_hat, biases,
    delta, baseline, reconstruction, total, penalty), ``numbers`` the values it quotes
    (each appears in ``text`` as :func:`fmt` writes it), ``holds`` whether the claim holds
    for the run (False: the sentence says that it does not)."""

    key: str
    text: str
    numbers: Mapping[str, float] = field(default_factory=dict)
    holds: bool = True


def _first_finite(values: np.ndarray) -> int | None:
    ok = np.flatnonzero(np.isfinite(values))
    return int(ok[0]) if ok.size else None


def _kl(rho: float, q: np.ndarray) -> np.ndarray:
    return rho * np.log(rho / q) + (1.0 - rho) * np.log((1.0 - rho) / (1.0 - q))


def _kl_sentence(d: Dynamics) -> Sentence:
    if d.beta == 0:
        return Sentence("kl_term", f"With beta = {fmt(0)} there is no KL term: nothing in the "
                        "loss pushes rho_hat down, so this run cannot show the mechanism.",
                        {"beta": 0}, holds=False)
    kl = d.terms["sparsity"]
    i = _first_finite(kl)
    if i is None or not np.isfinite(kl[-1]):
        return Sentence("kl_term", "The loss terms were not recorded for this run's samples, "
                        "so whether the KL term fell cannot be said.", {}, holds=False)
    nums = {"kl_first": float(kl[i]), "kl_last": float(kl[-1]),
            "iteration_first": int(d.iteration[i]), "iteration_last": int(d.iteration[-1])}
    where = (f"{fmt(nums['kl_first'])} at iteration {fmt(nums['iteration_first'])} to "
             f"{fmt(nums['kl_last'])} at iteration {fmt(nums['iteration_last'])}")
    if nums["kl_last"] < nums["kl_first"]:
        return Sentence("kl_term", "The KL term beta * sum_j KL(rho || rho_hat_j) falls from "
                        f"{where}.", nums)
    return Sentence("kl_term", f"The KL term does not fall: it goes from {where}.", nums,
                    holds=False)


def _rho_hat_sentence(d: Dynamics) -> Sentence:
    first, last = d.rho_hat[0], d.rho_hat[-1]
    nums = {"rho_hat_first": float(first.mean()), "rho_hat_last": float(last.mean()),
            "rho": d.rho, "near": int(((last >= d.rho / 2) & (last <= 2 * d.rho)).sum()),
            "units": d.n_units}
    moves = f"from {fmt(nums['rho_hat_first'])} to {fmt(nums['rho_hat_last'])}"
    tail = (f" (target rho = {fmt(d.rho)}); {fmt(nums['near'])} of {fmt(d.n_units)} units "
            "end within [rho/2, 2 rho]")
    if nums["rho_hat_last"] < nums["rho_hat_first"]:
        text = f"rho_hat, averaged over the units, moves down {moves}{tail}"
        if d.beta == 0:
            text += ", with no sparsity term at work (beta = 0)"
        return Sentence("rho_hat", text + ".", nums, holds=d.beta > 0)
    return Sentence("rho_hat", f"rho_hat does not fall: its mean over the units moves {moves}"
                    f"{tail}.", nums, holds=False)


def _bias_sentence(d: Dynamics) -> Sentence:
    first, last = d.b1[0], d.b1[-1]
    nums = {"b1_fall": float((first - last).mean()), "b1_first": float(first.mean()),
            "b1_last": float(last.mean()), "negative": int((last < 0).sum()),
            "units": d.n_units}
    means = f"mean b1 from {fmt(nums['b1_first'])} to {fmt(nums['b1_last'])}"
    neg = (f"{fmt(nums['negative'])} of {fmt(d.n_units)} units end with a negative bias")
    if nums["b1_fall"] > 0:
        cause = ", with no sparsity term at work (beta = 0)" if d.beta == 0 else ""
        return Sentence("biases", f"The hidden biases fall by {fmt(nums['b1_fall'])} on "
                        f"average ({means}){cause}; {neg}.", nums,
                        holds=d.penalty != "kl" or d.beta > 0)
    return Sentence("biases", f"The hidden biases do not fall ({means}, a fall of "
                    f"{fmt(nums['b1_fall'])}); {neg}.", nums, holds=False)


def _delta_sentence(d: Dynamics) -> Sentence:
    if d.beta == 0:
        return Sentence("delta", f"With beta = {fmt(0)} the sparsity delta_j is 0 for every "
                        "unit at every sample: nothing is added to the units' back-propagated "
                        "error, so nothing pushes their biases down.", {"beta": 0}, holds=False)
    above = d.rho_hat > d.rho
    positive = d.delta > 0
    nums = {"positive_first": int((positive[0] & above[0]).sum()),
            "above_first": int(above[0].sum()), "units": d.n_units,
            "positive_pairs": int((positive & above).sum()), "above_pairs": int(above.sum()),
            "delta_first": float(d.delta[0].mean()), "delta_last": float(d.delta[-1].mean())}
    if nums["above_pairs"] == 0:
        return Sentence("delta", f"No unit's rho_hat is above rho = {fmt(d.rho)} at any "
                        "sample, so the sparsity delta never pushes a unit down.",
                        {"rho": d.rho}, holds=False)
    holds = (nums["positive_pairs"] == nums["above_pairs"]
             and nums["positive_first"] == nums["above_first"])
    text = ("While rho_hat_j > rho, the sparsity delta_j = beta (-rho/rho_hat_j + "
            f"(1-rho)/(1-rho_hat_j)) is {'positive' if holds else 'not always positive'}: "
            f"at the first sample it is positive for {fmt(nums['positive_first'])} of the "
            f"{fmt(nums['above_first'])} units above the target (of {fmt(d.n_units)}; mean "
            f"delta {fmt(nums['delta_first'])}), and at {fmt(nums['positive_pairs'])} of the "
            f"{fmt(nums['above_pairs'])} (sample, unit) pairs above the target over the fit; "
            f"the mean delta ends at {fmt(nums['delta_last'])}. ")
    text += ("It adds delta_j * mean_i a_ij (1 - a_ij) to dJ/db1_j (and that times x_i, "
             "averaged, to dJ/dW1_j): the push that lowers unit j's pre-activation, hence "
             "rho_hat_j." if holds else
             "So the push down is not what this run shows.")
    return Sentence("delta", text, nums, holds=holds)


def baseline_problem(d: Dynamics, base: Dynamics) -> str | None:
    """Why ``base`` (a beta = 0 run) cannot be set against ``d``, or None if it can: both KL
    with the same rho, weight decay and number of units, their rho_hat on the same rows."""
    if d.penalty != "kl" or base.penalty != "kl":
        return "both runs need the KL penalty"
    if base.beta != 0:
        return f"its beta is {fmt(base.beta)}, not 0"
    for name in ("rho", "weight_decay", "n_units"):
        if getattr(d, name) != getattr(base, name):
            return (f"its {name} differs ({fmt(getattr(base, name))} against "
                    f"{fmt(getattr(d, name))})")
    if d.rows_sha256 != base.rows_sha256:
        return "it was trained on other data"
    if not (np.isfinite(base.terms["reconstruction"][-1])
            and np.isfinite(base.terms["weight_decay"][-1])
            and np.isfinite(d.terms["loss"][-1])):
        return "the loss terms of the last samples were not recorded"
    return None


def _baseline_sentences(d: Dynamics, base: Dynamics) -> list[Sentence]:
    problem = baseline_problem(d, base)
    if problem is not None:
        return [Sentence("baseline", "The beta = 0 run in this report cannot be set against "
                         f"this one: {problem}.", {}, holds=False)]
    R, R0 = float(d.terms["reconstruction"][-1]), float(base.terms["reconstruction"][-1])
    recon = {"given_up": R - R0, "reconstruction": R, "reconstruction_0": R0}
    if R > R0:
        out = [Sentence("reconstruction", f"Against the beta = 0 run, reconstruction gives up "
                        f"{fmt(R - R0)}: its term ends at {fmt(R)} here, {fmt(R0)} there.",
                        recon)]
    else:
        out = [Sentence("reconstruction", "Reconstruction gives up nothing against the beta = 0 "
                        f"run: its term ends at {fmt(R)} here, {fmt(R0)} there.",
                        {"reconstruction": R, "reconstruction_0": R0}, holds=False)]
    D0 = float(base.terms["weight_decay"][-1])
    K0 = float(d.beta * _kl(d.rho, base.rho_hat[-1]).sum())
    J, J0 = float(d.terms["loss"][-1]), R0 + D0 + K0
    K = float(d.terms["sparsity"][-1])
    nums = {"J": J, "J_0": J0, "reconstruction_0": R0, "weight_decay_0": D0, "kl_0": K0,
            "kl": K, "beta": d.beta}
    subset = "" if base.exact else (f" (rho_hat of the beta = 0 model taken on {base.n_rows} "
                                    f"of its {base.n_examples} training rows)")
    at = (f"at the beta = 0 model's parameters, {fmt(J0)} = reconstruction {fmt(R0)} + "
          f"weight decay {fmt(D0)} + KL term {fmt(K0)}{subset}")
    if J < J0:
        out.append(Sentence("total", f"The total J_beta (beta = {fmt(d.beta)}) is lower for "
                            f"this run, {fmt(J)}, than {at}: the optimiser lowers the sum, so it "
                            f"trades reconstruction for a KL term of {fmt(K)} instead of "
                            f"{fmt(K0)}.", nums))
    else:
        del nums["kl"]  # not quoted: there is no trade to describe
        out.append(Sentence("total", f"The total J_beta (beta = {fmt(d.beta)}) is not lower for "
                            f"this run, {fmt(J)}, than {at}.", nums, holds=False))
    return out


def answer(d: Dynamics, baseline: Dynamics | None = None) -> list[Sentence]:
    """The answer's sentences for the run ``d``; with ``baseline`` (a beta = 0 run, see
    :func:`baseline_problem`), also what the penalty costs and wins against it."""
    if not isinstance(d, Dynamics):
        raise ValueError(f"d must be a sae_core.dynamics.Dynamics; got {type(d).__name__}")
    if d.penalty != "kl":
        first, last = float(d.rho_hat[0].mean()), float(d.rho_hat[-1].mean())
        return [Sentence("penalty", f"This run uses the {d.penalty} penalty: it has no KL "
                         "term, so the question does not apply to it; its firing rate "
                         f"(a > 1e-3), averaged over the units, moves from {fmt(first)} to "
                         f"{fmt(last)}.", {"rate_first": first, "rate_last": last},
                         holds=False), _bias_sentence(d)]
    out = [_kl_sentence(d), _rho_hat_sentence(d), _bias_sentence(d), _delta_sentence(d)]
    if baseline is not None and d.beta > 0:
        out += _baseline_sentences(d, baseline)
    return out


def pick_baseline(d: Dynamics, runs: list[Dynamics | None]) -> Dynamics | None:
    """The beta = 0 KL run among ``runs`` to set ``d`` against: the first one that
    :func:`baseline_problem` accepts, else the first beta = 0 KL run (whose sentence then
    says why it cannot be compared), else None (also for ``d`` itself at beta = 0)."""
    if d.penalty != "kl" or d.beta == 0:
        return None
    bases = [b for b in runs if b is not None and b is not d and b.penalty == "kl"
             and b.beta == 0]
    return next((b for b in bases if baseline_problem(d, b) is None), bases[0] if bases else None)


def answers(runs: list[Dynamics | None]) -> list[list[Sentence]]:
    """:func:`answer` for each of several runs (None: a run without recorded dynamics,
    which gets no sentences), each beta > 0 KL run set against a beta = 0 run among them."""
    return [[] if d is None else answer(d, pick_baseline(d, runs)) for d in runs]
