"""Sparsity statistics: hand-computed cases, batch-split invariance, fitted models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from activations import HAND_A, stats_of

from sae_core import SparseAutoencoder
from sae_core import stats as stats_module
from sae_core.stats import (
    DESIGN_KEYS,
    SparsityAccumulator,
    hoyer_sparsity,
    kl_bernoulli,
    sparsity_stats,
)
from sae_core.units_table import PER_UNIT_COLUMNS


# ----------------------------------------------------------------- per unit
def test_rho_hat_and_firing_rate_by_hand():
    s = stats_of(HAND_A)
    assert s.rho_hat[0] == pytest.approx((0.0 + 0.6 + 0.9) / 3, rel=1e-15)
    assert s.rho_hat[1] == pytest.approx((0.0005 + 0.002 + 0.0) / 3, rel=1e-15)
    assert s.firing_rate.tolist() == [2 / 3, 1 / 3]
    assert s.max_activation.tolist() == [0.9, 0.002]
    assert s.rho_hat_min == s.rho_hat[1] and s.rho_hat_max == s.rho_hat[0]
    assert s.rho_hat_mean == pytest.approx((s.rho_hat[0] + s.rho_hat[1]) / 2)
    assert s.n_examples == 3 and s.dead_units == 0


def test_threshold_is_strict_and_configurable():
    assert stats_of([[1e-3]]).firing_rate[0] == 0.0  # equal to the threshold: not firing
    assert stats_of([[1e-3]], threshold=5e-4).firing_rate[0] == 1.0


def test_kl_per_unit_by_hand():
    rho = 0.1
    s = stats_of(HAND_A, rho=rho)

    def kl(q):
        return rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q))

    q0, q1 = 1.5 / 3, 0.0025 / 3
    assert s.kl_per_unit[0] == pytest.approx(kl(q0), rel=1e-12)
    assert s.kl_per_unit[1] == pytest.approx(kl(q1), rel=1e-12)
    assert s.kl_total == pytest.approx(kl(q0) + kl(q1), rel=1e-12)
    assert s.rho == rho
    # [rho/2, 2 rho] = [0.05, 0.2]: neither 0.5 nor 0.00083 is inside
    assert s.frac_units_near_target == 0.0


def test_kl_clips_rho_hat_and_rejects_non_probabilities():
    rho = 0.05
    got = kl_bernoulli(rho, np.array([0.0, 1.0, 1.5, rho]))
    assert got[0] == pytest.approx(
        rho * math.log(rho / 1e-12) + (1 - rho) * math.log((1 - rho) / (1 - 1e-12)), rel=1e-9
    )
    assert np.isfinite(got[1]) and got[1] > got[0]
    assert math.isnan(got[2])  # a ReLU mean above 1 is not a Bernoulli probability
    assert got[3] == pytest.approx(0.0, abs=1e-15)


def test_without_rho_the_kl_figures_are_none():
    s = stats_of(HAND_A)
    assert s.rho is None and s.kl_per_unit is None and s.kl_total is None
    assert s.frac_units_near_target is None
    assert s.metrics()["kl_total"] is None
    assert np.isnan(s.per_unit()["kl"]).all()


def test_frac_units_near_target_bounds_are_inclusive():
    rho = 0.25
    # unit means: rho/2, 2 rho, rho, just below rho/2
    A = np.array([[rho / 2, 2 * rho, rho, 0.12]])
    assert stats_of(A, rho=rho).frac_units_near_target == 3 / 4


def test_dead_unit_is_reported_dead():
    A = HAND_A.copy()
    A = np.column_stack([A, np.zeros(3)])
    s = stats_of(A, rho=0.1)
    assert s.dead_units == 1
    assert s.firing_rate[2] == 0.0 and s.rho_hat[2] == 0.0
    assert s.kurtosis[2] == 0.0  # constant unit: 0, not NaN
    assert np.isfinite(s.kl_per_unit[2])  # rho_hat clipped to 1e-12 inside the log


def test_dense_units_counted():
    m = 10
    A = np.zeros((m, 4))
    A[:2, 0] = 1.0  # fires on 20%: dense at 10%, not at 50%
    A[:6, 1] = 1.0  # 60%: dense at both
    A[:1, 2] = 1.0  # exactly 10%: not more than 10%, so not dense
    # unit 3 never fires
    s = stats_of(A)
    assert s.dense_units == {0.1: 2, 0.5: 1}
    assert s.dead_units == 1
    m_ = s.metrics()
    assert m_["dense_units_10pct"] == 2 and m_["dense_units_50pct"] == 1


# ----------------------------------------------------------------- per example
def test_l0_and_hoyer_on_hand_vectors():
    rows = np.array(
        [
            [0.0, 0.0, 3.0, 0.0],  # one-hot: L0 1, Hoyer 1
            [2.0, 2.0, 2.0, 2.0],  # constant: L0 4, Hoyer 0
            [3.0, 4.0, 0.0, 0.0],  # ||.||_1 = 7, ||.||_2 = 5: (2 - 7/5) / (2 - 1)
            [0.0, 0.0, 0.0, 0.0],  # silent: L0 0, Hoyer 1 by convention
            [5e-4, 0.0, 0.0, 0.0],  # below the threshold: L0 0; still one-hot for Hoyer
        ]
    )
    h = hoyer_sparsity(rows)
    assert h[0] == 1.0
    assert h[1] == pytest.approx(0.0, abs=1e-12)
    assert h[2] == pytest.approx((2 - 7 / 5) / (2 - 1), rel=1e-12)
    assert h[3] == 1.0 and h[4] == 1.0
    s = stats_of(rows)
    assert s.l0_histogram.tolist() == [2, 1, 1, 0, 1]
    assert s.l0_mean == (1 + 4 + 2 + 0 + 0) / 5
    assert s.hoyer_mean == pytest.approx(h.sum() / 5, rel=1e-14)


def test_hoyer_is_scale_invariant_and_survives_tiny_values():
    a = np.array([[3.0, 4.0, 0.0, 1.0]])
    expected = hoyer_sparsity(a)[0]
    assert hoyer_sparsity(a * 1e-200)[0] == pytest.approx(expected, rel=1e-12)
    assert hoyer_sparsity(-a)[0] == pytest.approx(expected, rel=1e-12)  # uses |a|
    assert hoyer_sparsity(np.array([[0.7], [0.0]])).tolist() == [1.0, 1.0]  # s = 1


# ----------------------------------------------------------------- kurtosis
def test_kurtosis_matches_scipy():
    rng = np.random.default_rng(3)
    A = np.column_stack(
        [
            rng.exponential(size=301),
            rng.uniform(size=301),
            rng.standard_t(5, size=301) + 1e4,  # large offset: raw power sums would cancel
            (rng.uniform(size=301) < 0.05).astype(float),  # sparse binary unit
        ]
    )
    expected = scipy.stats.kurtosis(A, axis=0, fisher=True, bias=True)
    s = stats_of(A, splits=[1, 50, 51, 200])
    np.testing.assert_allclose(s.kurtosis, expected, rtol=1e-9)
    assert s.kurtosis_mean == pytest.approx(expected.mean(), rel=1e-9)


def test_kurtosis_by_hand():
    # values 0, 0, 0, 1: mean 1/4, M2 = 3/16 + 9/16 = 3/4, M4 = 3/256 + 81/256 = 84/256;
    # m M4 / M2^2 - 3 = 4 (84/256) / (9/16) - 3 = 7/3 - 3 = -2/3
    s = stats_of(np.array([[0.0], [0.0], [0.0], [1.0]]), splits=[1, 3])
    assert s.kurtosis[0] == pytest.approx(-2 / 3, rel=1e-14)
    # symmetric two-point unit -1, 1 (a ReLU unit is >= 0, but the formula is general):
    # M2 = 2, M4 = 2, 2 * 2 / 4 - 3 = -2
    assert stats_of(np.array([[-1.0], [1.0]])).kurtosis[0] == pytest.approx(-2.0, rel=1e-14)


def test_kurtosis_of_constant_unit_is_zero():
    A = np.column_stack([np.full(7, 0.3), np.zeros(7), np.arange(7.0)])
    s = stats_of(A, splits=[2, 3])
    assert s.kurtosis[0] == 0.0 and s.kurtosis[1] == 0.0
    assert s.kurtosis[2] == pytest.approx(
        scipy.stats.kurtosis(np.arange(7.0), fisher=True, bias=True), rel=1e-12
    )


# ----------------------------------------------------------------- reconstruction
@pytest.fixture
def recon_case():
    rng = np.random.default_rng(7)
    m, n, s = 103, 6, 5
    X = rng.normal(loc=3.0, scale=[0.1, 1, 2, 0.5, 1, 3], size=(m, n))
    X_hat = X + rng.normal(scale=0.3, size=(m, n))
    A = np.maximum(rng.normal(size=(m, s)), 0.0)
    return A, X, X_hat


def test_mse_and_fvu_closed_form(recon_case):
    A, X, X_hat = recon_case
    m, n = X.shape
    s = stats_of(A, X, X_hat)
    sse = np.sum((X - X_hat) ** 2)
    sst = np.sum((X - X.mean(axis=0)) ** 2)
    assert s.sse == pytest.approx(sse, rel=1e-13)
    assert s.mse == pytest.approx(sse / (m * n), rel=1e-13)
    assert s.sse_per_example == pytest.approx(sse / m, rel=1e-13)
    assert s.total_sum_squares == pytest.approx(sst, rel=1e-12)
    assert s.fvu == pytest.approx(sse / sst, rel=1e-12)


def test_mse_and_fvu_by_hand():
    X = np.array([[0.0, 1.0], [1.0, 1.0]])
    X_hat = np.array([[0.5, 1.0], [1.0, 0.0]])
    s = stats_of(np.zeros((2, 1)), X, X_hat, splits=[1])
    # errors 0.5, 0, 0, 1: SSE = 0.25 + 1 = 1.25 over m n = 4 values
    assert s.sse == 1.25 and s.mse == 1.25 / 4 and s.sse_per_example == 1.25 / 2
    # column means (0.5, 1): SST = 0.25 + 0.25 + 0 + 0 = 0.5 (each batch alone has SST 0)
    assert s.total_sum_squares == pytest.approx(0.5, rel=1e-15)
    assert s.fvu == pytest.approx(2.5, rel=1e-15)


def _approx(value):
    """A metric's value to 1e-12; None (a figure an accumulator alone has not) exactly."""
    return None if value is None else pytest.approx(value, rel=1e-12, abs=1e-12)


def test_every_statistic_is_invariant_to_the_batch_split(recon_case):
    A, X, X_hat = recon_case
    whole = stats_of(A, X, X_hat, rho=0.2)
    split = stats_of(A, X, X_hat, splits=[1, 2, 10, 11, 40, 90], rho=0.2)  # 7 uneven batches
    for key, value in whole.metrics().items():
        assert split.metrics()[key] == _approx(value), key
    for key, column in whole.per_unit().items():
        np.testing.assert_allclose(split.per_unit()[key], column, rtol=1e-12, atol=1e-12)
    assert split.l0_histogram.tolist() == whole.l0_histogram.tolist()


def test_large_batches_are_processed_in_row_chunks(recon_case, monkeypatch):
    A, X, X_hat = recon_case
    whole = stats_of(A, X, X_hat, rho=0.2)
    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", 13)  # 2 rows per chunk here
    chunked = stats_of(A, X, X_hat, rho=0.2)
    for key, value in whole.metrics().items():
        assert chunked.metrics()[key] == _approx(value), key


def test_fvu_is_zero_for_perfect_and_one_for_mean_reconstruction(recon_case):
    A, X, _ = recon_case
    assert stats_of(A, X, X.copy(), splits=[30]).fvu == 0.0
    X_mean = np.broadcast_to(X.mean(axis=0), X.shape)
    assert stats_of(A, X, X_mean, splits=[30, 31]).fvu == pytest.approx(1.0, rel=1e-12)


def test_fvu_is_nan_and_metric_null_for_constant_data():
    X = np.ones((4, 2))
    s = stats_of(np.ones((4, 1)), X, X)
    assert math.isnan(s.fvu) and s.metrics()["fvu"] is None


# ----------------------------------------------------------------- inputs
def test_torch_inputs_match_numpy(recon_case):
    A, X, X_hat = recon_case
    acc = SparsityAccumulator(A.shape[1], X.shape[1])
    acc.update(torch.from_numpy(A).float(), torch.from_numpy(X), torch.from_numpy(X_hat))
    got = acc.result()
    ref = stats_of(A.astype(np.float32), X, X_hat)
    assert got.metrics() == ref.metrics()


def test_bad_inputs_are_rejected():
    acc = SparsityAccumulator(2, 3)
    with pytest.raises(ValueError, match="no examples"):
        acc.result()
    with pytest.raises(ValueError, match="A must have 2 columns"):
        acc.update(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="X_hat must have shape"):
        acc.update(np.zeros((4, 2)), np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((1, 2), np.nan), np.zeros((1, 3)), np.zeros((1, 3)))
    acc.update(np.zeros((1, 2)), np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="rho"):
        acc.result(rho=1.0)


# ----------------------------------------------------------------- fitted models
def test_topk_l0_is_k(small_X):
    """TopK keeps the k largest pre-activations z and ReLUs them, so L0 <= k on every
    example, with equality exactly when each row's k largest z exceed the threshold
    (a trained model may leave some negative). To test equality robustly, the hidden
    biases are then raised until every pre-activation is >= 1: each row must then have
    exactly k firing units, whatever the weights the short fit produced."""
    k = 3
    sae = SparseAutoencoder(
        n_components=12, penalty="topk", k=k, solver="adam", max_iter=3, device="cpu"
    ).fit(small_X)
    s = sparsity_stats(sae, small_X, batch_size=64)
    assert s.l0_mean <= k
    assert s.l0_histogram[k + 1 :].sum() == 0
    assert s.rho is None and s.kl_total is None  # no KL target for ReLU units

    z = (small_X - sae.intercept_visible_) @ sae.components_.T + sae.intercept_hidden_
    sae.intercept_hidden_ = sae.intercept_hidden_ + max(0.0, 1.0 - z.min())
    s = sparsity_stats(sae, small_X, batch_size=64)
    assert s.l0_mean == k
    assert s.l0_histogram[k] == small_X.shape[0]


def test_sparsity_stats_on_kl_fit(small_X):
    sae = SparseAutoencoder(
        n_components=5, rho=0.05, max_iter=5, dtype="float64", device="cpu"
    ).fit(small_X)  # float64, so that batching inside BLAS cannot move the last digits
    s = sparsity_stats(sae, small_X, batch_size=37)
    assert s.rho == sae.rho
    metrics = s.metrics()
    assert set(DESIGN_KEYS) <= set(metrics)
    assert set(metrics) == {
        *DESIGN_KEYS,
        "dense_units_10pct",
        "dense_units_50pct",
        "kurtosis_mean",
        "lifetime_sparseness_mean",
        "population_sparseness_mean",
        "active_fraction_mean",
        "n_examples",
    }
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    json.dumps(metrics, allow_nan=False)
    assert metrics["n_examples"] == small_X.shape[0]
    # the same numbers as from the estimator's own transform / reconstruct
    A, X_hat = sae.transform(small_X), sae.reconstruct(small_X)
    np.testing.assert_allclose(s.rho_hat, A.mean(axis=0), rtol=1e-12)
    assert s.mse == pytest.approx(np.mean((small_X - X_hat) ** 2), rel=1e-12)
    assert s.kl_total == pytest.approx(kl_bernoulli(sae.rho, A.mean(axis=0)).sum(), rel=1e-12)
    assert set(s.per_unit()) == set(PER_UNIT_COLUMNS)
    # the lifetime and population sparseness and the active fraction, straight from A
    m, units = A.shape
    lifetime = (1 - A.mean(axis=0) ** 2 / (A**2).mean(axis=0)) / (1 - 1 / m)
    np.testing.assert_allclose(s.lifetime_sparseness, lifetime, rtol=1e-10)
    pop = (1 - A.mean(axis=1) ** 2 / (A**2).mean(axis=1)) / (1 - 1 / units)
    assert s.population_sparseness_mean == pytest.approx(pop.mean(), rel=1e-10)
    active = (A > 0.1 * A.max(axis=0)).mean(axis=0)
    np.testing.assert_array_equal(s.active_fraction, active)
    assert metrics["active_fraction_mean"] == pytest.approx(active.mean(), rel=1e-12)


def test_unit_with_huge_negative_bias_is_reported_dead(small_X):
    rho = 0.05
    sae = SparseAutoencoder(n_components=4, rho=rho, max_iter=2, device="cpu").fit(small_X)
    before = sparsity_stats(sae, small_X)
    assert before.firing_rate[0] > 0  # a sigmoid unit near its initial weights fires
    sae.intercept_hidden_ = sae.intercept_hidden_.copy()
    sae.intercept_hidden_[0] = -1e4  # sigmoid(W1 x - 1e4) = 0 for every input here
    s = sparsity_stats(sae, small_X)
    assert s.dead_units == before.dead_units + 1
    assert s.firing_rate[0] == 0.0 and s.max_activation[0] == 0.0 and s.rho_hat[0] == 0.0
    assert s.kl_per_unit[0] == pytest.approx(kl_bernoulli(rho, np.array([0.0]))[0], rel=1e-12)
    assert s.metrics()["dead_units"] == s.dead_units
    np.testing.assert_array_equal(s.rho_hat[1:], before.rho_hat[1:])  # the others unchanged


def test_lifetime_and_population_sparseness_extremes():
    """A unit on for one example of four is maximally sparse over its lifetime (1), one
    equally on for all is not (0), one that is 0 throughout has none (NaN). A row with
    one active unit is maximally sparse across the population, an all-zero row has none
    and is left out of the mean."""
    A = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0]])
    s = stats_of(A, splits=[1, 3])
    assert s.lifetime_sparseness[0] == pytest.approx(1.0)
    assert s.lifetime_sparseness[1] == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(s.lifetime_sparseness[2])
    assert s.lifetime_sparseness_mean == pytest.approx(0.5)
    # row 0: units 0 and 1 active (0.5 of the way from dense to one-hot with s = 3 ->
    # (1 - (1.5/3)^2 / (1.25/3)) / (2/3) = 0.6); rows 1-3: one unit each -> 1
    assert s.population_sparseness_mean == pytest.approx((0.6 + 3 * 1.0) / 4)
    zeros = stats_of(np.zeros((3, 2)))
    assert math.isnan(zeros.population_sparseness_mean)
    assert s.active_fraction is None and s.metrics()["active_fraction_mean"] is None
    assert np.isnan(s.per_unit()["active_fraction"]).all()
