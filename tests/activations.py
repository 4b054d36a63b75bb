"""Hidden activations by hand, and their statistics, for the tests of sae_core.stats and
sae_core.units_table."""

from __future__ import annotations

import itertools

import numpy as np

from sae_core.stats import SparsityAccumulator

# Unit 0 takes 0, 0.6, 0.9: mean 0.5, fires on 2 of 3 examples.
# Unit 1 takes 0.0005, 0.002, 0: mean 0.0025 / 3, fires once (0.0005 is under 1e-3).
HAND_A = np.array([[0.0, 0.0005], [0.6, 0.002], [0.9, 0.0]])


def stats_of(A, X=None, X_hat=None, *, splits=None, threshold=1e-3, **result_kw):
    """Accumulate A (and X, X_hat; zeros by default) in the given row splits."""
    A = np.asarray(A, dtype=np.float64)
    if X is None:
        X = np.zeros((A.shape[0], 1))
    if X_hat is None:
        X_hat = X
    X, X_hat = np.asarray(X, dtype=np.float64), np.asarray(X_hat, dtype=np.float64)
    acc = SparsityAccumulator(A.shape[1], X.shape[1], fire_threshold=threshold)
    bounds = [0, *(splits or []), A.shape[0]]
    for lo, hi in itertools.pairwise(bounds):
        acc.update(A[lo:hi], X[lo:hi], X_hat[lo:hi])
    return acc.result(**result_kw)
