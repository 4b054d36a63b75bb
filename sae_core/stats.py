"""Sparsity statistics of a fitted sparse autoencoder on a (held-out) data set.

Notation: m examples, n inputs, s hidden units; a batch gives activations A (b, s), inputs
X (b, n) and reconstructions X_hat (b, n). Everything is accumulated in float64 by
:class:`SparsityAccumulator`, batch after batch, so that the statistics of a whole set do
not depend on how it was split (up to float64 rounding, ~1e-15 relative):

Per unit j (lifetime statistics, over the examples)::

    rho_hat_j     = (1/m) sum_i a_ij                (mean activation: Ng's lifetime density)
    firing_rate_j = (1/m) #{i : a_ij > threshold}
    KL_j          = rho log(rho / q_j) + (1 - rho) log((1 - rho) / (1 - q_j)),
                    q_j = clip(rho_hat_j, 1e-12, 1 - 1e-12)
    kurtosis_j    = m M4_j / M2_j^2 - 3              (excess kurtosis, biased estimator),
                    M_p,j = sum_i (a_ij - rho_hat_j)^p
    max_j         = max_i a_ij
    lifetime_j    = (1 - rho_hat_j^2 / mean_i a_ij^2) / (1 - 1/m)
                    (Treves-Rolls sparseness over the examples, Vinje & Gallant 2000:
                    0 for a unit equally active on every example, 1 for one active on a
                    single example; NaN for a unit that is 0 throughout)
    active_j      = (1/m) #{i : a_ij > 0.1 max_j}   (how often the unit is on at all,
                    against its own peak: Ng's "inactive most of the time" read off
                    directly; a second pass over the data, :func:`sparsity_stats`)

Per example i (population statistics, averaged over the examples)::

    L0_i    = #{j : a_ij > threshold}
    Hoyer_i = (sqrt(s) - ||a_i||_1 / ||a_i||_2) / (sqrt(s) - 1)   in [0, 1]
    pop_i   = (1 - (sum_j a_ij / s)^2 / (sum_j a_ij^2 / s)) / (1 - 1/s)
              (Treves-Rolls sparseness across the units, in [0, 1]; examples with no
              active unit, or s = 1, have none and are left out of its mean)

Reconstruction, numerator and denominator each summed over the whole set::

    SSE = sum_i ||x_i - x_hat_i||^2,   MSE = SSE / (m n)
    SST = sum_i ||x_i - x_bar||^2,     x_bar = (1/m) sum_i x_i
    FVU = SSE / SST

(averaging FVU per batch instead gives a wrong number: each batch would be centred on its
own mean). The central sums M2..M4 of the units and the per-feature mean and M2 of X
are merged batch by batch with the parallel update of Chan et al. (1979) / Pébay (2008),
not formed from raw power sums (sum a^4 - ...), which cancel catastrophically for units
whose spread is small against their mean (a saturated sigmoid unit, a feature with a
large offset).

The module depends on numpy only; :func:`sparsity_stats` imports torch when called, and
torch tensors given to :meth:`SparsityAccumulator.update` are recognised without importing
torch here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_core.config import FIRE_THRESHOLD
from sae_core.outputs import json_with_keys

DESIGN_KEYS = (
    "rho",
    "rho_hat_mean",
    "rho_hat_min",
    "rho_hat_max",
    "frac_units_near_target",
    "dead_units",
    "kl_total",
    "l0_mean",
    "hoyer_mean",
    "mse",
    "fvu",
)
"""The keys of ``metrics/sparsity.json`` named in DESIGN.md ("Stage outputs")."""

KL_CLIP = 1e-12
"""rho_hat is clipped into [KL_CLIP, 1 - KL_CLIP] inside the logarithms of the KL term."""

CONSTANT_RELATIVE_STD = 1e-12
"""A unit whose standard deviation is at most this times |mean| (or exactly 0) is constant:
its kurtosis is reported as 0 (the ratio M4 / M2^2 is then 0/0 or rounding noise)."""

ACTIVE_FRACTION_OF_MAX = 0.1
"""A unit is active on an example (``active_fraction``) above this fraction of its peak."""

_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of about 4M float64 values (32 MB)


def _as_float64(x: Any, name: str) -> np.ndarray:
    """A 2-d float64 numpy copy/view of a numpy array, array-like or torch tensor."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-d (batch, features); got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _merge_moments(
    n_a: int, mean: np.ndarray, moments: list[np.ndarray], batch: np.ndarray
) -> None:
    """Merge the central sums of ``batch`` (b, d) into ``mean`` and ``moments`` in place.

    ``moments`` is [M2] or [M2, M3, M4], each (d,), the central sums of the n_a examples
    seen so far. Pairwise update (Chan et al. 1979; Pébay 2008), with delta = mean_b -
    mean_a and n = n_a + n_b::

        M2 = M2a + M2b + delta^2 n_a n_b / n
        M3 = M3a + M3b + delta^3 n_a n_b (n_a - n_b) / n^2 + 3 delta (n_a M2b - n_b M2a) / n
        M4 = M4a + M4b + delta^4 n_a n_b (n_a^2 - n_a n_b + n_b^2) / n^3
             + 6 delta^2 (n_a^2 M2b + n_b^2 M2a) / n^2 + 4 delta (n_a M3b - n_b M3a) / n
    """
    na, nb = float(n_a), float(batch.shape[0])
    n = na + nb
    mean_b = batch.mean(axis=0)
    dev = batch - mean_b
    dev2 = dev * dev
    m2b = dev2.sum(axis=0)
    delta = mean_b - mean
    if len(moments) == 3:
        m2a, m3a, m4a = moments
        m3b = (dev2 * dev).sum(axis=0)
        m4b = (dev2 * dev2).sum(axis=0)
        d2 = delta * delta
        m4 = (
            m4a
            + m4b
            + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6.0 * d2 * (na * na * m2b + nb * nb * m2a) / n**2
            + 4.0 * delta * (na * m3b - nb * m3a) / n
        )
        m3 = (
            m3a
            + m3b
            + d2 * delta * na * nb * (na - nb) / n**2
            + 3.0 * delta * (na * m2b - nb * m2a) / n
        )
        m4a[...] = m4
        m3a[...] = m3
    moments[0] += m2b + delta * delta * (na * nb / n)
    mean += delta * (nb / n)


def hoyer_sparsity(A: np.ndarray) -> np.ndarray:
    """Hoyer's sparsity of each row of A (b, s) -> (b,), in [0, 1]::

        S(a) = (sqrt(s) - ||a||_1 / ||a||_2) / (sqrt(s) - 1)

    1 for a one-hot row, 0 for a row whose entries all have the same magnitude.

    Conventions: an all-zero row gets S = 1. The measure is scale-invariant and 0/0 there;
    a row with no active unit is at least as sparse as a one-hot row (its L0 is 0), and
    giving it 0 (dense) or NaN would make a model with many silent examples look dense or
    poison the mean. With s = 1 every row gets 1 (the denominator is 0; a single unit is
    trivially as sparse as it can be). Rows are divided by their largest magnitude before
    the norms (S is scale-invariant), so tiny activations do not underflow in ||a||_2.
    """
    A = np.asarray(A, dtype=np.float64)
    b, s = A.shape
    out = np.ones(b, dtype=np.float64)
    if s == 1 or b == 0:
        return out
    mag = np.abs(A)
    peak = mag.max(axis=1)
    active = peak > 0
    r = mag[active] / peak[active, None]
    ratio = r.sum(axis=1) / np.sqrt((r * r).sum(axis=1))
    root = math.sqrt(s)
    out[active] = np.clip((root - ratio) / (root - 1.0), 0.0, 1.0)
    return out


def population_sparseness(A: np.ndarray) -> np.ndarray:
    """Treves-Rolls sparseness of each row of A (b, s) across its s units, (b,)::

        pop_i = (1 - (sum_j a_ij / s)^2 / (sum_j a_ij^2 / s)) / (1 - 1/s)

    in [0, 1] for non-negative activations: 0 when every unit is equally active, 1 when
    one unit carries the whole row. NaN for a row of zeros, or when s = 1."""
    s = A.shape[1]
    if s == 1:
        return np.full(A.shape[0], np.nan)
    mean = A.mean(axis=1)
    mean_sq = np.einsum("ij,ij->i", A, A) / s
    with np.errstate(divide="ignore", invalid="ignore"):
        tr = mean * mean / mean_sq
    return np.where(mean_sq > 0, (1.0 - tr) / (1.0 - 1.0 / s), np.nan)


def _nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (no warning) when there are none."""
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


def kl_bernoulli(rho: float, rho_hat: np.ndarray) -> np.ndarray:
    """KL(rho || q) between Bernoulli(rho) and Bernoulli(q), elementwise, q = rho_hat::

        KL = rho log(rho / q) + (1 - rho) log((1 - rho) / (1 - q))

    q is clipped into [1e-12, 1 - 1e-12], so a unit that is never (or always) on gives a
    large finite value (about rho * 27.6 for q -> 0) instead of inf. q outside [0, 1] (the
    mean of an unbounded ReLU unit above 1) is not a probability: NaN.
    """
    rho_hat = np.asarray(rho_hat, dtype=np.float64)
    q = np.clip(rho_hat, KL_CLIP, 1.0 - KL_CLIP)
    kl = rho * np.log(rho / q) + (1.0 - rho) * np.log((1.0 - rho) / (1.0 - q))
    return np.where((rho_hat >= 0.0) & (rho_hat <= 1.0), kl, np.nan)


def _json_number(x: Any) -> float | int | None:
    """A JSON-safe number: ints stay ints, NaN/inf/None become None (null)."""
    if x is None:
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def _dense_key(threshold: float) -> str:
    return f"dense_units_{100.0 * threshold:.6g}pct"


SPARSITY_METRICS = json_with_keys("saeflow sparsity statistics (JSON)", "rho_hat_mean", "fvu")
"""The kind of file :meth:`SparsityStats.metrics` is written to."""


@dataclass(frozen=True, eq=False)
class SparsityStats:
    """Sparsity statistics of one data set (see the module docstring for the maths).

    Per-unit arrays have shape (s,); ``l0_histogram`` has shape (s + 1,) (entry c counts the
    examples with exactly c units above the threshold). Fields that need the target
    ``rho`` (``kl_per_unit``, ``kl_total``, ``frac_units_near_target``) are None without it.
    """

    n_examples: int
    """m."""
    n_components: int
    """s."""
    n_features: int
    """n."""
    fire_threshold: float
    """A unit fires on an example when its activation is > this (1e-3, as Gao et al.)."""
    rho: float | None
    """The target mean activation the KL figures refer to, or None."""
    rho_hat: np.ndarray
    """(s,) mean activation of each unit over the examples (lifetime density)."""
    firing_rate: np.ndarray
    """(s,) fraction of examples on which the unit fires."""
    kl_per_unit: np.ndarray | None
    """(s,) KL(rho || rho_hat_j) (rho_hat clipped into [1e-12, 1 - 1e-12]; NaN where
    rho_hat is outside [0, 1]); None without rho."""
    kurtosis: np.ndarray
    """(s,) excess kurtosis of each unit's responses (0 for a constant unit)."""
    max_activation: np.ndarray
    """(s,) largest activation of each unit."""
    lifetime_sparseness: np.ndarray
    """(s,) Treves-Rolls sparseness of each unit over the examples (NaN: a unit that
    is 0 on every example)."""
    active_fraction: np.ndarray | None
    """(s,) fraction of examples on which the unit exceeds 0.1 of its own maximum (0 for
    a unit whose maximum is <= 0); None from an accumulator alone (it needs the maxima
    before a second pass: :func:`sparsity_stats`)."""
    l0_histogram: np.ndarray
    """(s + 1,) number of examples with exactly c units firing, c = 0..s."""
    rho_hat_mean: float
    rho_hat_min: float
    rho_hat_max: float
    frac_units_near_target: float | None
    """Fraction of units with rho/2 <= rho_hat_j <= 2 rho; None without rho."""
    dead_units: int
    """Units that never fire on the set."""
    dense_units: dict[float, int]
    """{t: number of units whose firing rate is > t} for each dense threshold t."""
    kl_total: float | None
    """sum_j KL(rho || rho_hat_j) (NaN if some unit's rho_hat is outside [0, 1]); None
    without rho."""
    l0_mean: float
    """Mean over examples of L0 (units firing per example)."""
    hoyer_mean: float
    """Mean over examples of Hoyer's sparsity of the activation vector."""
    kurtosis_mean: float
    """Mean over units of the excess kurtosis."""
    lifetime_sparseness_mean: float
    """Mean over the units that have one of their lifetime sparseness (NaN if none)."""
    population_sparseness_mean: float
    """Mean over the examples that have one of their population sparseness (NaN if
    none)."""
    active_fraction_mean: float | None
    """Mean over units of ``active_fraction``; None without it."""
    sse: float
    """sum_i ||x_i - x_hat_i||^2."""
    sse_per_example: float
    """SSE / m (twice the reconstruction term of the training objective)."""
    mse: float
    """SSE / (m n): mean squared error per element."""
    total_sum_squares: float
    """sum_i ||x_i - x_bar||^2 with the mean x_bar of the whole set."""
    fvu: float
    """SSE / total_sum_squares; NaN when the data have no variance."""

    def metrics(self) -> dict[str, float | int | None]:
        """The scalars for ``metrics/sparsity.json``: DESIGN.md's keys plus
        ``dense_units_<p>pct`` per dense threshold (``dense_units_10pct`` and
        ``dense_units_50pct`` by default), ``kurtosis_mean``, the lifetime and population
        sparseness means, ``active_fraction_mean`` and ``n_examples``.

        Values are Python ints/floats; a figure that is undefined (no rho, NaN) is None, so
        ``json.dumps(..., allow_nan=False)`` always works.
        """
        out: dict[str, float | int | None] = {
            "rho": self.rho,
            "rho_hat_mean": self.rho_hat_mean,
            "rho_hat_min": self.rho_hat_min,
            "rho_hat_max": self.rho_hat_max,
            "frac_units_near_target": self.frac_units_near_target,
            "dead_units": self.dead_units,
            "kl_total": self.kl_total,
            "l0_mean": self.l0_mean,
            "hoyer_mean": self.hoyer_mean,
            "mse": self.mse,
            "fvu": self.fvu,
        }
        for t, count in self.dense_units.items():
            out[_dense_key(t)] = count
        out["kurtosis_mean"] = self.kurtosis_mean
        out["lifetime_sparseness_mean"] = self.lifetime_sparseness_mean
        out["population_sparseness_mean"] = self.population_sparseness_mean
        out["active_fraction_mean"] = self.active_fraction_mean
        out["n_examples"] = self.n_examples
        return {k: _json_number(v) for k, v in out.items()}

    def per_unit(self) -> dict[str, np.ndarray]:
        """Columns of a per-unit table, each (s,): unit, rho_hat, firing_rate, kl (NaN
        without rho), kurtosis, max_activation, lifetime_sparseness, active_fraction (NaN
        without it)."""
        kl = self.kl_per_unit
        if kl is None:
            kl = np.full(self.n_components, np.nan)
        active = self.active_fraction
        if active is None:
            active = np.full(self.n_components, np.nan)
        return {
            "unit": np.arange(self.n_components),
            "rho_hat": self.rho_hat.copy(),
            "firing_rate": self.firing_rate.copy(),
            "kl": kl.copy(),
            "kurtosis": self.kurtosis.copy(),
            "max_activation": self.max_activation.copy(),
            "lifetime_sparseness": self.lifetime_sparseness.copy(),
            "active_fraction": active.copy(),
        }


class SparsityAccumulator:
    """Accumulates sparsity and reconstruction statistics over batches, in float64.

    Parameters
    ----------
    n_components : int
        Hidden units s (columns of A).
    n_features : int
        Inputs n (columns of X and X_hat).
    fire_threshold : float, default=1e-3
        A unit fires on an example when its activation is strictly above this.

    The state is O(s + n): per unit the running mean, central sums M2, M3, M4, firing
    count and maximum; the histogram of L0; the sum of Hoyer values; per feature the
    running mean and M2 of X; the SSE. Merging uses Chan/Pébay's parallel update, so any
    split of the same rows into batches gives the same result up to float64 rounding.

    Examples
    --------
    >>> import numpy as np
    >>> acc = SparsityAccumulator(n_components=2, n_features=3)
    >>> A = np.array([[0.0, 0.5], [0.2, 0.0]])
    >>> X = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    >>> acc.update(A, X, X)
    >>> s = acc.result()
    >>> s.rho_hat.tolist(), s.l0_mean, s.fvu
    ([0.1, 0.25], 1.0, 0.0)
    """

    def __init__(self, n_components: int, n_features: int, fire_threshold: float = FIRE_THRESHOLD):
        if int(n_components) < 1 or int(n_features) < 1:
            raise ValueError(
                f"n_components and n_features must be >= 1; got {n_components}, {n_features}"
            )
        if not math.isfinite(float(fire_threshold)):
            raise ValueError(f"fire_threshold must be finite; got {fire_threshold!r}")
        s, n = int(n_components), int(n_features)
        self.n_components = s
        self.n_features = n
        self.fire_threshold = float(fire_threshold)
        self.n_examples = 0
        self._a_mean = np.zeros(s)
        self._a_moments = [np.zeros(s), np.zeros(s), np.zeros(s)]  # M2, M3, M4
        self._fire_count = np.zeros(s, dtype=np.int64)
        self._a_max = np.full(s, -np.inf)
        self._l0_hist = np.zeros(s + 1, dtype=np.int64)
        self._hoyer_sum = 0.0
        self._population_sum = 0.0  # of pop_i over the examples that have one
        self._population_count = 0
        self._x_mean = np.zeros(n)
        self._x_m2 = [np.zeros(n)]
        self._sse = 0.0

    def update(self, A: Any, X: Any, X_hat: Any) -> None:
        """Add a batch: A (b, s) activations, X (b, n) inputs, X_hat (b, n) reconstructions.

        numpy arrays, array-likes or torch tensors (any device/dtype; copied to float64 on
        the CPU). Non-finite values are an error. A batch of 0 rows changes nothing.
        """
        A = _as_float64(A, "A")
        X = _as_float64(X, "X")
        X_hat = _as_float64(X_hat, "X_hat")
        b = A.shape[0]
        if A.shape[1] != self.n_components:
            raise ValueError(f"A must have {self.n_components} columns; got shape {A.shape}")
        for name, arr in (("X", X), ("X_hat", X_hat)):
            if arr.shape != (b, self.n_features):
                raise ValueError(
                    f"{name} must have shape ({b}, {self.n_features}) to match A; got {arr.shape}"
                )
        rows = max(1, _CHUNK_ELEMENTS // max(self.n_components, self.n_features))
        for start in range(0, b, rows):
            sl = slice(start, start + rows)
            self._update_chunk(A[sl], X[sl], X_hat[sl])

    def _update_chunk(self, A: np.ndarray, X: np.ndarray, X_hat: np.ndarray) -> None:
        fires = A > self.fire_threshold
        self._fire_count += fires.sum(axis=0)
        np.maximum(self._a_max, A.max(axis=0), out=self._a_max)
        self._l0_hist += np.bincount(fires.sum(axis=1), minlength=self.n_components + 1)
        self._hoyer_sum += float(hoyer_sparsity(A).sum())
        pop = population_sparseness(A)
        defined = ~np.isnan(pop)
        self._population_sum += float(pop[defined].sum())
        self._population_count += int(defined.sum())
        _merge_moments(self.n_examples, self._a_mean, self._a_moments, A)
        err = X - X_hat
        self._sse += float(np.einsum("ij,ij->", err, err))
        _merge_moments(self.n_examples, self._x_mean, self._x_m2, X)
        self.n_examples += A.shape[0]

    def result(
        self, rho: float | None = None, dense_thresholds: tuple[float, ...] = (0.1, 0.5)
    ) -> SparsityStats:
        """The statistics of everything seen so far (the accumulator is left unchanged).

        Parameters
        ----------
        rho : float in (0, 1) or None
            Target mean activation: KL per unit and in total, and the fraction of units
            with rho_hat in [rho/2, 2 rho]. None leaves those figures None.
        dense_thresholds : tuple of float in [0, 1)
            A unit is dense at t when it fires on more than a fraction t of the examples.
        """
        m = self.n_examples
        if m == 0:
            raise ValueError("no examples accumulated: call update() with data first")
        if rho is not None and not (0.0 < float(rho) < 1.0):
            raise ValueError(f"rho must be in (0, 1); got {rho!r}")
        for t in dense_thresholds:
            if not (0.0 <= float(t) < 1.0):
                raise ValueError(f"dense thresholds must be in [0, 1); got {t!r}")

        rho_hat = self._a_mean.copy()
        firing_rate = self._fire_count / m
        m2, _, m4 = self._a_moments
        constant = m2 <= m * (CONSTANT_RELATIVE_STD * np.abs(rho_hat)) ** 2
        safe_m2 = np.where(constant, 1.0, m2)
        kurtosis = np.where(constant, 0.0, m * m4 / (safe_m2 * safe_m2) - 3.0)

        kl_per_unit = kl_total = near = None
        if rho is not None:
            rho = float(rho)
            kl_per_unit = kl_bernoulli(rho, rho_hat)
            kl_total = float(kl_per_unit.sum())
            near = float(np.mean((rho_hat >= rho / 2) & (rho_hat <= 2 * rho)))

        # mean_i a_ij^2 = M2_j / m + rho_hat_j^2 (the moments are central)
        mean_sq = m2 / m + rho_hat * rho_hat
        with np.errstate(divide="ignore", invalid="ignore"):
            lifetime = (1.0 - rho_hat * rho_hat / mean_sq) / (1.0 - 1.0 / m) if m > 1 \
                else np.full(self.n_components, np.nan)
        lifetime = np.where(mean_sq > 0, lifetime, np.nan)
        pops = self._population_count
        counts = np.arange(self.n_components + 1)
        sst = float(self._x_m2[0].sum())
        fvu = self._sse / sst if sst > 0 else math.nan
        return SparsityStats(
            n_examples=m,
            n_components=self.n_components,
            n_features=self.n_features,
            fire_threshold=self.fire_threshold,
            rho=rho,
            rho_hat=rho_hat,
            firing_rate=firing_rate,
            kl_per_unit=kl_per_unit,
            kurtosis=kurtosis,
            max_activation=self._a_max.copy(),
            lifetime_sparseness=lifetime,
            active_fraction=None,
            l0_histogram=self._l0_hist.copy(),
            rho_hat_mean=float(rho_hat.mean()),
            rho_hat_min=float(rho_hat.min()),
            rho_hat_max=float(rho_hat.max()),
            frac_units_near_target=near,
            dead_units=int((self._fire_count == 0).sum()),
            dense_units={float(t): int((firing_rate > t).sum()) for t in dense_thresholds},
            kl_total=kl_total,
            l0_mean=float((self._l0_hist * counts).sum()) / m,
            hoyer_mean=self._hoyer_sum / m,
            kurtosis_mean=float(kurtosis.mean()),
            lifetime_sparseness_mean=_nanmean(lifetime),
            population_sparseness_mean=self._population_sum / pops if pops else math.nan,
            active_fraction_mean=None,
            sse=self._sse,
            sse_per_example=self._sse / m,
            mse=self._sse / (m * self.n_features),
            total_sum_squares=sst,
            fvu=fvu,
        )


def sparsity_stats(
    estimator: Any,
    X: Any,
    batch_size: int = 65_536,
    rho: float | None = None,
    *,
    fire_threshold: float = FIRE_THRESHOLD,
    dense_thresholds: tuple[float, ...] = (0.1, 0.5),
) -> SparsityStats:
    """Statistics of a fitted :class:`sae_core.SparseAutoencoder` on X (m, n), in batches.

    Each batch is encoded once and decoded from the same code, with the arithmetic of the
    estimator's ``transform`` and ``reconstruct`` (its device and dtype, its effective
    decoder as stored). X is validated as ``transform`` does (feature count; [0, 1] for
    ``penalty="kl"``). ``rho`` defaults to the estimator's ``rho`` for ``penalty="kl"`` and
    to None (no KL figures) for L1/TopK, whose ReLU means are not Bernoulli probabilities.
    """
    import torch
    from sklearn.utils.validation import check_is_fitted

    from sae_core import model as M
    from sae_core.device import resolve_device, resolve_dtype, to_tensor

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    check_is_fitted(estimator)
    config = estimator._config()
    X = estimator._validated(X, reset=False, config=config)
    if rho is None and config.penalty == "kl":
        rho = config.rho
    device = resolve_device(estimator.device)
    dtype = resolve_dtype(estimator.dtype)
    p = estimator._params_on(device, dtype)
    acc = SparsityAccumulator(config.n_components, X.shape[1], fire_threshold)
    with torch.no_grad():
        for start in range(0, X.shape[0], int(batch_size)):
            x_np = X[start : start + int(batch_size)]
            xb = to_tensor(x_np, device, dtype)
            a = M.encode(p, xb, config.penalty, config.effective_k)
            # p.W2 is the stored effective decoder (already unit-norm): applied as is
            out = torch.addmm(p.b2, a, p.W2.t())
            x_hat = torch.sigmoid(out) if config.penalty == "kl" else out
            acc.update(a, x_np, x_hat)  # the data as given, not their cast to dtype
        stats = acc.result(rho=rho, dense_thresholds=dense_thresholds)
        # the second pass: each unit against its own peak, known only now
        peak = torch.as_tensor(ACTIVE_FRACTION_OF_MAX * stats.max_activation, device=device,
                               dtype=dtype)
        active = np.zeros(config.n_components, dtype=np.int64)
        for start in range(0, X.shape[0], int(batch_size)):
            xb = to_tensor(X[start : start + int(batch_size)], device, dtype)
            a = M.encode(p, xb, config.penalty, config.effective_k)
            active += ((a > peak) & (peak > 0)).sum(dim=0).cpu().numpy()
    fraction = active / X.shape[0]
    return dataclasses.replace(stats, active_fraction=fraction,
                               active_fraction_mean=float(fraction.mean()))
