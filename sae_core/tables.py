"""The tables of a run, for ``dvc plots`` and for the pictures of :mod:`sae_core.plots`:
the loss terms per iteration and rho_hat per unit, as CSV with deterministic bytes (floats
written as Python's shortest round-trip ``repr``, "\\n" line ends), and the checks of the
arrays they come from. Kept apart from the pictures, so that the train stage, which writes
the loss table, does not depend on how a picture is drawn."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sae_core.io import atomic_path
from sae_core.outputs import csv_with_header

LOSS_COLUMNS = ("iteration", "loss", "reconstruction", "weight_decay", "sparsity")
"""Columns of :func:`write_loss_csv` (``auxiliary`` is appended when the history has it)."""
LOSS_TERMS = ("reconstruction", "weight_decay", "sparsity")
"""The terms of J (besides ``auxiliary``, present for TopK with AuxK)."""
LOSS_CSV = csv_with_header("a saeflow loss CSV", "iteration,loss,")
RHO_HAT_CSV = csv_with_header("a saeflow rho_hat CSV", "unit,rho_hat,target")


def finite_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """x as a finite float64 array of ``ndim`` dimensions, not empty."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric; got {type(x).__name__}") from None
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-d; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr

def rho_hat_array(x: Any, name: str = "rho_hat") -> np.ndarray:
    arr = finite_array(x, name, 1)
    if (arr < 0).any():
        raise ValueError(f"{name} has negative values (mean activations are >= 0)")
    return arr

def checked_rho(rho: float | None) -> float | None:
    if rho is None:
        return None
    if not (isinstance(rho, (int, float, np.floating)) and 0.0 < float(rho) < 1.0):
        raise ValueError(f"rho must be a number in (0, 1) or None; got {rho!r}")
    return float(rho)

def history_columns(history: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The per-iteration records (``SparseAutoencoder.history_``) as columns, each (T,).

    Every record must hold the numbers loss, reconstruction, weight_decay and sparsity;
    ``iteration`` is taken from the records when all have it (else 0..T-1), and
    ``auxiliary`` is included when any record has it (missing entries count as 0).
    """
    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise ValueError("history must be a list of per-iteration dicts (history_)")
    if len(history) == 0:
        raise ValueError("history is empty")
    names = ["loss", *LOSS_TERMS]
    cols: dict[str, list[float]] = {name: [] for name in names}
    has_iter = all(isinstance(r, Mapping) and "iteration" in r for r in history)
    has_aux = any(isinstance(r, Mapping) and "auxiliary" in r for r in history)
    iters, aux = [], []
    for t, record in enumerate(history):
        if not isinstance(record, Mapping):
            raise ValueError(f"history[{t}] must be a dict; got {type(record).__name__}")
        for name in names:
            if name not in record:
                raise ValueError(f"history[{t}] has no {name!r}")
            cols[name].append(record[name])
        iters.append(record["iteration"] if has_iter else t)
        aux.append(record.get("auxiliary", 0.0))
    out = {"iteration": finite_array(iters, "history iteration", 1).astype(np.int64)}
    for name in names:
        out[name] = finite_array(cols[name], f"history {name}", 1)
    if has_aux:
        out["auxiliary"] = finite_array(aux, "history auxiliary", 1)
    return out

def _num(x: float) -> str:
    """A float as Python's shortest round-trip repr (deterministic, exact)."""
    return repr(float(x))

def _write_csv(path: str | os.PathLike, header: Sequence[str], rows: list[list[str]],
               kind) -> None:
    text = "".join(",".join(r) + "\n" for r in [list(header), *rows])
    with atomic_path(path, kind) as tmp:
        tmp.write_bytes(text.encode("ascii"))

def write_loss_csv(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """The loss terms per iteration as CSV for ``dvc plots``, atomically.

    Columns ``iteration, loss, reconstruction, weight_decay, sparsity`` (and
    ``auxiliary`` when the records have it: the terms then sum to the loss); one row per
    record of ``history`` (``SparseAutoencoder.history_``); floats as Python's shortest
    round-trip repr, "\\n" line ends: the same history gives the same bytes.
    """
    cols = history_columns(history)
    header = [*LOSS_COLUMNS, *(["auxiliary"] if "auxiliary" in cols else [])]
    rows = [
        [str(int(cols["iteration"][t]))] + [_num(cols[c][t]) for c in header[1:]]
        for t in range(cols["loss"].size)
    ]
    _write_csv(path, header, rows, LOSS_CSV)

def write_rho_hat_csv(
    path: str | os.PathLike, rho_hat: np.ndarray, rho: float | None = None
) -> None:
    """rho_hat per unit as CSV for ``dvc plots``, atomically: columns ``unit, rho_hat,
    target`` (target = rho on every row, empty without one); floats as shortest repr."""
    v = rho_hat_array(rho_hat)
    rho = checked_rho(rho)
    target = "" if rho is None else _num(rho)
    _write_csv(path, ["unit", "rho_hat", "target"],
               [[str(j), _num(v[j]), target] for j in range(v.size)], RHO_HAT_CSV)
