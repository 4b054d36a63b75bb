"""The hidden units over training: what the sparsity term does to them, recorded by a
:class:`~sae_core.train.Trainer` callback and stored as one long Parquet table.

For Ng's sigmoid/KL model (x in R^n, s hidden units, m examples)::

    a_ij      = sigmoid(W1 x_i + b1)_j
    rho_hat_j = (1/m) sum_i a_ij
    delta_j   = beta * (-rho / rho_hat_j + (1 - rho) / (1 - rho_hat_j))

``delta_j`` is what the sparsity term adds to unit j's back-propagated error before the
product with a_ij (1 - a_ij) (CS294A notes), so its share of the hidden-bias gradient is
``delta_j * (1/m) sum_i a_ij (1 - a_ij)``. It is positive exactly while rho_hat_j > rho
(for beta > 0): a positive push on dJ/db1_j, which descent turns into a falling b1_j and a
falling rho_hat_j. That is how a term that *adds* to the loss switches units off.

:class:`DynamicsRecorder` samples every ``every`` iterations (L-BFGS iterations or Adam
epochs), at the start and at the end of a fit, and at each of the first ``every``
iterations (L-BFGS drives rho_hat from about 0.5 to rho within them; at the exercise's
settings that adds 9 samples to 41): every unit's rho_hat_j, its bias b1_j and delta_j,
and the loss terms of that iteration (from ``trainer.history``). rho_hat is taken
on the training rows themselves when there are at most ``max_rows`` of them (the exercise's
10,000 patches: exactly the rho_hat the objective sees), else on a fixed subset of
``max_rows`` rows drawn once with numpy's generator seeded by ``seed`` (the torch RNG is
never touched). It only reads ``trainer.theta``; the trained bytes are those of a fit
without it.

For penalties other than KL (L1, TopK: ReLU units) rho_hat is the firing rate, the
fraction of the rows on which a_ij > 1e-3 (:data:`sae_core.config.FIRE_THRESHOLD`), and
delta is null: there is no KL term whose gradient it would be.

The table (:func:`write_dynamics`, :func:`read_dynamics`) has one row per (sample, unit),
sorted by iteration then unit: ``iteration, unit, rho_hat, b1, delta`` and the sample's
loss terms ``loss, reconstruction, weight_decay, sparsity, auxiliary``. The terms belong
to the sample, not the unit: every unit's row of a sample repeats them (a ``group by
iteration`` gives the per-iteration table; Parquet compresses the repeats away), so one
file holds one table and each row says everything about its observation. A term that the
trainer did not record at that iteration (Adam has no record of epoch 0) is null.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae_core.config import FIRE_THRESHOLD, invalid_setting, is_int
from sae_core.outputs import parquet_with_metadata
from sae_core.train import Callback

DEFAULT_EVERY = 10
"""Sampling interval of the pipeline's train stage (params.yaml ``train.dynamics_every``)."""
MAX_ROWS = 10_000
"""At most this many training rows give rho_hat (more: a seeded subset of this many)."""
TERM_COLUMNS = ("loss", "reconstruction", "weight_decay", "sparsity", "auxiliary")
COLUMNS = ("iteration", "unit", "rho_hat", "b1", "delta", *TERM_COLUMNS)
"""Columns of the dynamics table, in order."""
FORMAT_VERSION = 1
_META_KEY = b"saeflow.dynamics"
DYNAMICS = parquet_with_metadata("a saeflow dynamics table (Parquet)", _META_KEY)
"""The kind of file :func:`write_dynamics` writes."""


def check_every(every: Any, name: str = "dynamics_every") -> int:
    """``every`` as an int >= 1, or the one-line ValueError of a bad setting."""
    if not is_int(every) or every < 1:
        invalid_setting(name, "an integer >= 1 (iterations between two samples)", every)
    return int(every)


def sparsity_delta(rho_hat: np.ndarray, rho: float, beta: float) -> np.ndarray:
    """delta_j = beta * (-rho / rho_hat_j + (1 - rho) / (1 - rho_hat_j)), float64, shape of
    rho_hat: the KL term's addition to unit j's back-propagated error."""
    q = np.asarray(rho_hat, dtype=np.float64)
    with np.errstate(divide="ignore"):  # rho_hat at 0 or 1: an infinite push, kept as such
        return beta * (-rho / q + (1.0 - rho) / (1.0 - q))


@dataclass(frozen=True, eq=False)
class Dynamics:
    """A recorded fit: T samples of s units.

    ``iteration`` (T,) int64, increasing; ``rho_hat``, ``b1``, ``delta`` (T, s) float64
    (delta NaN for non-KL penalties); ``terms`` maps each of :data:`TERM_COLUMNS` to (T,)
    float64 (NaN where the trainer had no record). The rest describes the fit: its
    penalty, rho, beta, weight_decay, the sampling interval, how many training rows it had
    (``n_examples``), how many gave rho_hat (``n_rows``) and their sha256 (``rows_sha256``:
    two fits with equal digests saw the same rows).
    """

    iteration: np.ndarray
    rho_hat: np.ndarray
    b1: np.ndarray
    delta: np.ndarray
    terms: Mapping[str, np.ndarray]
    penalty: str = "kl"
    rho: float = 0.01
    beta: float = 3.0
    weight_decay: float = 1e-4
    every: int = DEFAULT_EVERY
    n_examples: int = 0
    n_rows: int = 0
    rows_sha256: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form notes carried in the file's metadata (e.g. the solver)."""

    def __post_init__(self) -> None:
        it = np.asarray(self.iteration)
        if it.ndim != 1 or it.size == 0:
            raise ValueError(f"Dynamics iteration must be a non-empty 1-d array; got {it.shape}")
        if it.size > 1 and not (np.diff(it) > 0).all():
            raise ValueError("Dynamics iteration must be strictly increasing")
        shape = np.shape(self.rho_hat)
        if len(shape) != 2 or shape[0] != it.size:
            raise ValueError(f"Dynamics rho_hat must be (T={it.size}, s); got {shape}")
        for name in ("b1", "delta"):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"Dynamics {name} must have rho_hat's shape {shape}; "
                                 f"got {np.shape(getattr(self, name))}")
        for name in TERM_COLUMNS:
            if np.shape(self.terms.get(name, ())) != (it.size,):
                raise ValueError(f"Dynamics terms[{name!r}] must have shape ({it.size},)")

    @property
    def n_units(self) -> int:
        return int(np.shape(self.rho_hat)[1])

    @property
    def exact(self) -> bool:
        """rho_hat was taken on every training row (not a subset)."""
        return self.n_rows == self.n_examples

    def meta(self) -> dict[str, Any]:
        """The JSON metadata stored in the file's schema."""
        return {"format_version": FORMAT_VERSION, "penalty": self.penalty, "rho": self.rho,
                "beta": self.beta, "weight_decay": self.weight_decay, "every": self.every,
                "n_examples": self.n_examples, "n_rows": self.n_rows,
                "rows_sha256": self.rows_sha256, "fire_threshold": FIRE_THRESHOLD,
                "extra": dict(self.extra)}


def probe_rows(X: Any, max_rows: int = MAX_ROWS, seed: int = 0) -> np.ndarray:
    """The rows rho_hat is taken on, as a new array: all of X (m, n) when m <= max_rows,
    else ``max_rows`` rows drawn without replacement by ``np.random.default_rng(seed)``, in
    their order in X.
    X: a numpy array, a torch tensor or a :class:`sae_core.rows.RowSource`."""
    from sae_core.rows import RowSource

    if isinstance(X, RowSource):
        X = X.array
    if hasattr(X, "detach"):  # a torch tensor
        X = X.detach().cpu().numpy()
    m = X.shape[0]
    if m <= max_rows:
        return np.array(X)  # a copy: a memory-mapped store is read-only, and may go away
    pick = np.sort(np.random.default_rng(seed).choice(m, size=max_rows, replace=False))
    return np.asarray(X[pick])


def _sha256(rows: np.ndarray) -> str:
    arr = np.ascontiguousarray(rows)
    h = hashlib.sha256(f"{arr.shape}{arr.dtype}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class DynamicsRecorder(Callback):
    """A Trainer callback recording rho_hat, b1, delta and the loss terms every ``every``
    iterations, at each of the first ``every`` and at the last (see the module docstring).

    Parameters
    ----------
    X : array (m, n), torch tensor or RowSource
        The training data (the rows the fit sees).
    every : int >= 1
        Iterations (L-BFGS) or epochs (Adam) between two samples.
    max_rows : int >= 1
        At most this many rows give rho_hat (a seeded subset when m is larger).
    seed : int
        Seed of that subset (numpy's own generator).

    After the fit, :meth:`result` returns the :class:`Dynamics`.
    """

    def __init__(self, X: Any, every: int = DEFAULT_EVERY, max_rows: int = MAX_ROWS,
                 seed: int = 0) -> None:
        self.every = check_every(every)
        if not is_int(max_rows) or max_rows < 1:
            invalid_setting("max_rows", "an integer >= 1", max_rows)
        rows = probe_rows(X, int(max_rows), seed)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"X must be a non-empty 2-d array (m, n); got shape {rows.shape}")
        self.n_examples = int(X.shape[0])
        self._rows = rows
        self.rows_sha256 = _sha256(rows)
        self._X = None  # the rows as a tensor of the trainer's dtype, on its device
        self._samples: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._terms: dict[int, dict[str, float]] = {}
        self._config = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer) -> None:
        import torch

        self._config = trainer.config
        self._X = torch.as_tensor(self._rows).to(device=trainer.device, dtype=trainer.dtype)
        self._sample(trainer)

    def on_iteration_end(self, trainer) -> None:
        if trainer.iteration % self.every == 0 or trainer.iteration < self.every:
            self._sample(trainer)

    def on_fit_end(self, trainer) -> None:
        self._sample(trainer)
        # the history is complete now (L-BFGS records iteration 0 after on_fit_start)
        for record in trainer.history:
            it = int(record["iteration"])
            if any(s[0] == it for s in self._samples):
                self._terms[it] = {k: float(record.get(k, math.nan)) for k in TERM_COLUMNS}
        self._X = None  # do not hold a copy of the data beyond the fit

    # ------------------------------------------------------------------ work
    def _sample(self, trainer) -> None:
        import torch

        from sae_core import model as M

        it = int(trainer.iteration)
        if self._samples and self._samples[-1][0] >= it:
            return  # already sampled (the last iteration, also a multiple of every)
        cfg = trainer.config
        with torch.no_grad():  # reads theta only: no graph, no RNG, no trainer state
            p = M.unpack(trainer.theta.detach(), trainer.n_features, cfg.n_components)
            A = M.encode(p, self._X, cfg.penalty, cfg.effective_k)
            if cfg.penalty != "kl":
                A = A > FIRE_THRESHOLD
            rho_hat = A.sum(dim=0, dtype=torch.float64) / A.shape[0]
            self._samples.append((it, rho_hat.cpu().numpy(),
                                  p.b1.to(torch.float64).cpu().numpy().copy()))

    def result(self) -> Dynamics:
        """The samples so far as :class:`Dynamics` (after at least one fit)."""
        if not self._samples or self._config is None:
            raise ValueError("DynamicsRecorder has no samples: pass it to a fit first")
        cfg = self._config
        iters = np.array([s[0] for s in self._samples], dtype=np.int64)
        rho_hat = np.stack([s[1] for s in self._samples])
        b1 = np.stack([s[2] for s in self._samples])
        if cfg.penalty == "kl":
            delta = sparsity_delta(rho_hat, cfg.rho, cfg.beta)
        else:
            delta = np.full_like(rho_hat, np.nan)
        nan = {k: math.nan for k in TERM_COLUMNS}
        terms = {k: np.array([self._terms.get(int(i), nan)[k] for i in iters])
                 for k in TERM_COLUMNS}
        return Dynamics(iters, rho_hat, b1, delta, terms, penalty=cfg.penalty,
                        rho=float(cfg.rho), beta=float(cfg.beta),
                        weight_decay=float(cfg.weight_decay), every=self.every,
                        n_examples=self.n_examples, n_rows=int(self._rows.shape[0]),
                        rows_sha256=self.rows_sha256, extra={"solver": cfg.solver})


# ----------------------------------------------------------------------------- file
def _schema():
    import pyarrow as pa

    return pa.schema(
        [pa.field("iteration", pa.int64(), nullable=False),
         pa.field("unit", pa.int64(), nullable=False),
         pa.field("rho_hat", pa.float64(), nullable=False),
         pa.field("b1", pa.float64(), nullable=False),
         pa.field("delta", pa.float64())]
        + [pa.field(k, pa.float64()) for k in TERM_COLUMNS])


def write_dynamics(path: str | os.PathLike, dyn: Dynamics) -> None:
    """Write ``dyn`` as the long table of the module docstring (T * s rows), atomically,
    with deterministic bytes (the same dynamics give the same file). NaN in delta and the
    terms is written as null; the settings go into the schema metadata."""
    import pyarrow as pa

    from sae_core.io import write_tagged_parquet

    if not isinstance(dyn, Dynamics):
        raise ValueError(f"dyn must be a Dynamics; got {type(dyn).__name__}")
    T, s = np.shape(dyn.rho_hat)

    def col(values: np.ndarray) -> Any:
        v = np.asarray(values, dtype=np.float64).ravel()
        return pa.array(v, mask=np.isnan(v))

    schema = _schema().with_metadata({_META_KEY: json.dumps(dyn.meta(), sort_keys=True)})
    arrays = [pa.array(np.repeat(np.asarray(dyn.iteration, dtype=np.int64), s)),
              pa.array(np.tile(np.arange(s, dtype=np.int64), T)),
              pa.array(np.asarray(dyn.rho_hat, dtype=np.float64).ravel()),
              pa.array(np.asarray(dyn.b1, dtype=np.float64).ravel()),
              col(dyn.delta)]
    arrays += [col(np.repeat(dyn.terms[k], s)) for k in TERM_COLUMNS]
    write_tagged_parquet(path, pa.Table.from_arrays(arrays, schema=schema), DYNAMICS,
                         use_dictionary=False)


def read_dynamics(path: str | os.PathLike) -> Dynamics:
    """Read a table written by :func:`write_dynamics`; anything else is a one-line
    ValueError naming the file."""
    from sae_core.io import read_tagged_parquet

    table, meta = read_tagged_parquet(path, _META_KEY, _schema(), FORMAT_VERSION,
                                      "a saeflow dynamics table")
    cols = {k: table.column(k).to_numpy(zero_copy_only=False) for k in COLUMNS}
    iters, first = np.unique(cols["iteration"], return_index=True)
    T = iters.size
    s = table.num_rows // max(T, 1)
    expected_units = np.tile(np.arange(s), T)
    if (T == 0 or T * s != table.num_rows or not np.array_equal(cols["unit"], expected_units)
            or not np.array_equal(cols["iteration"], np.repeat(iters, s))):
        raise ValueError(f"{path}: not a saeflow dynamics table (rows are not one per "
                         "(iteration, unit), in order)")

    def grid(name: str) -> np.ndarray:
        return np.asarray(cols[name], dtype=np.float64).reshape(T, s)

    return Dynamics(iters.astype(np.int64), grid("rho_hat"), grid("b1"), grid("delta"),
                    {k: np.asarray(cols[k], dtype=np.float64)[first] for k in TERM_COLUMNS},
                    penalty=meta["penalty"], rho=float(meta["rho"]), beta=float(meta["beta"]),
                    weight_decay=float(meta["weight_decay"]), every=int(meta["every"]),
                    n_examples=int(meta["n_examples"]), n_rows=int(meta["n_rows"]),
                    rows_sha256=str(meta["rows_sha256"]), extra=meta.get("extra") or {})
